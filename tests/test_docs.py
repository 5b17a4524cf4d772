"""The docs point at things that exist: every relative link and ``#anchor`` in README.md and
docs/*.md resolves, and every ``noetl-edge <command>`` written in backticks in README.md and
docs/cli.md is a command (and subcommand) of ``edge.cli.parsers.build_parser()``.

Anchors are checked against the heading slugs GitHub renders: lowercase, each space a ``-``,
punctuation other than ``-`` and ``_`` dropped, and a repeated heading suffixed ``-1``, ``-2``…

>>> Slugger().slug("Read-your-writes: `min_seq`")
'read-your-writes-min_seq'
>>> s = Slugger(); [s.slug("Limits"), s.slug("Limits"), s.slug("Limits")]
['limits', 'limits-1', 'limits-2']
"""

from __future__ import annotations

import argparse
import functools
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.cli.parsers import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_DOCS = [REPO / "README.md", REPO / "docs" / "cli.md"]

# Commands the docs announce as planned, not built: each must still be absent from the parser
# (so this list goes when the command lands) and every mention of it must say "planned".
PLANNED: set[tuple[str, ...]] = set()  # e.g. {("events", "tail")} until `events tail` landed

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
MENTION = re.compile(r"(?<![\w-])noetl-edge(?![\w-])")
LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")  # GitHub's lines of a source file: #L10, #L10-L20
WORD = re.compile(r"^[a-z][a-z0-9-]*$")


class Slugger:
    """GitHub's heading ids (github-slugger): one instance per document, so repeats count.

    >>> s = Slugger(); [s.slug("`noetl-edge up`"), s.slug("Crash safety — and [what](x.md) *is not*")]
    ['noetl-edge-up', 'crash-safety--and-what-is-not']
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def slug(self, heading: str) -> str:
        text = INLINE_LINK.sub(lambda m: m.group(1), heading).replace("`", "").replace("*", "")
        text = re.sub(r"<[^>]+>", "", text).lower()
        base = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM").replace(" ", "-")
        slug = base
        while slug in self.seen:
            self.seen[base] += 1
            slug = f"{base}-{self.seen[base]}"
        self.seen[slug] = 0
        return slug


@dataclass(frozen=True)
class Document:
    """A Markdown file split into prose (fenced blocks blanked, line numbers kept) and fenced lines."""

    path: Path
    prose: str
    fenced: tuple[tuple[int, str], ...]
    stray_fences: tuple[int, ...] = ()

    @classmethod
    def read(cls, path: Path) -> Document:
        return cls.read_text(path, path.read_text())

    @classmethod
    def read_text(cls, path: Path, markdown: str) -> Document:
        prose: list[str] = []
        fenced: list[tuple[int, str]] = []
        stray: list[int] = []  # a closing fence with text after it does not close: the rest turns code
        fence = ""
        for number, line in enumerate(markdown.splitlines(), start=1):
            opening = FENCE.match(line)
            if fence:
                closes = bool(opening) and line.lstrip().startswith(fence)
                if closes and not line.strip().strip(fence[0]):
                    fence = ""
                else:
                    if closes:
                        stray.append(number)
                    fenced.append((number, line))
                prose.append("")
            elif opening:
                fence = opening.group(1)
                prose.append("")
            else:
                prose.append(line)
        if fence:
            stray.append(len(prose))
        return cls(path, "\n".join(prose), tuple(fenced), tuple(stray))

    @property
    def name(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    def line_of(self, offset: int) -> int:
        return self.prose.count("\n", 0, offset) + 1

    def code_spans(self) -> Iterator[tuple[int, str]]:
        """(line, content) of each inline code span, a line break inside one read as a space."""
        for m in CODE_SPAN.finditer(self.prose):
            yield self.line_of(m.start()), re.sub(r"\s*\n\s*", " ", m.group(2)).strip()

    def text(self) -> str:
        """The prose with code spans blanked, so a link written as code is not a link."""
        return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), self.prose)

    def links(self) -> Iterator[tuple[int, str]]:
        text = self.text()
        for m in INLINE_LINK.finditer(text):
            yield self.line_of(m.start(2)), m.group(2).strip("<>")
        for m in REFERENCE_DEF.finditer(text):
            yield self.line_of(m.start(1)), m.group(1).strip("<>")

    def anchors(self) -> set[str]:
        slugger = Slugger()
        return {slugger.slug(m.group(2)) for line in self.prose.splitlines() if (m := HEADING.match(line))}


def link_problem(doc: Document, target: str) -> str | None:
    """Why a link target does not resolve, or None when it does (or is not relative)."""
    if SCHEME.match(target) or target.startswith("//"):
        return None
    path_part, _, anchor = target.partition("#")
    dest = (doc.path.parent / path_part).resolve()
    if not dest.is_relative_to(REPO):
        return f"{path_part} leaves the repository"
    if not dest.exists():
        return f"{path_part} does not exist"
    if not anchor:
        return None
    if not path_part:
        return None if anchor in doc.anchors() else f"no heading here has the slug #{anchor}"
    if dest.is_file() and dest.suffix != ".md" and LINE_ANCHOR.match(anchor):
        return None
    if dest.suffix != ".md" or dest.is_dir():
        return f"#{anchor} points into {dest.relative_to(REPO).as_posix()}, which has no headings"
    anchors = Document.read(dest).anchors()
    if anchor not in anchors:
        return f"no heading in {dest.relative_to(REPO).as_posix()} has the slug #{anchor}"
    return None


@functools.cache
def parser_tree() -> argparse.ArgumentParser:
    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def resolve_command(words: list[str]) -> tuple[tuple[str, ...], str | None]:
    """Walk the words after ``noetl-edge`` down the parser: (the command path, why it is not real).

    >>> resolve_command(["playbook", "register", "FILE", "--tenant"])
    (('playbook', 'register'), None)
    >>> resolve_command(["play"])
    (('play',), "'play' is not a command of noetl-edge")
    """
    parser = parser_tree()
    path: tuple[str, ...] = ()
    for word in words:
        choices = subcommands(parser)
        if not choices or not WORD.match(word):
            break
        path = (*path, word)
        if word not in choices:
            where = " ".join(("noetl-edge", *path[:-1]))
            return path, f"{word!r} is not a command of {where}"
        parser = choices[word]
    return path, None


def command_mentions(doc: Document) -> Iterator[tuple[int, str]]:
    """(line, text after ``noetl-edge``) for each mention in a code span or a fenced block."""
    for number, code in (*doc.code_spans(), *doc.fenced):
        for m in MENTION.finditer(code):
            yield number, code[m.end() :].split("`")[0].rstrip()


def command_problem(paragraph: str, rest: str, planned_commands: set[tuple[str, ...]] = PLANNED) -> str | None:
    """Why the words after ``noetl-edge`` are no command; a planned one passes where its paragraph says so."""
    path, problem = resolve_command(rest.split())
    planned = next((p for p in planned_commands if p[: len(path)] == path), None) if problem else None
    if planned is None:
        return problem
    if "planned" in paragraph.lower():
        return None
    return f"{problem} (`noetl-edge {' '.join(planned)}` is planned: say so in its paragraph)"


def paragraph(lines: list[str], number: int) -> str:
    """The lines around 1-based line ``number`` up to the blank lines that bound it."""
    start = end = number - 1
    while start > 0 and lines[start - 1].strip():
        start -= 1
    while end + 1 < len(lines) and lines[end + 1].strip():
        end += 1
    return " ".join(lines[start : end + 1])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    document = Document.read(doc)
    broken = [
        f"{document.name}:{number}: ({target}) {problem}"
        for number, target in document.links()
        if (problem := link_problem(document, target))
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_code_fences_close(doc: Path) -> None:
    document = Document.read(doc)
    stray = [f"{document.name}:{n}: a code fence that does not close (text after it, or end of file)"
             for n in document.stray_fences]
    assert not stray, "\n".join(stray)


@pytest.mark.parametrize("doc", COMMAND_DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_noetl_edge_commands_are_real(doc: Path) -> None:
    document = Document.read(doc)
    lines = doc.read_text().splitlines()
    stale = [
        f"{document.name}:{number}: `noetl-edge{rest}` {problem}"
        for number, rest in command_mentions(document)
        if (problem := command_problem(paragraph(lines, number), rest))
    ]
    assert not stale, "commands the parser does not have:\n" + "\n".join(stale)


def test_planned_commands_are_not_built_yet() -> None:
    """When a planned command lands, drop it from PLANNED (and 'planned' from the docs)."""
    built = [p for p in PLANNED if resolve_command(list(p))[1] is None]
    assert not built, f"built now, no longer planned: {built}"


def test_the_check_finds_what_it_should() -> None:
    """The checker itself: a broken file, anchor and command are caught with file and line."""
    docs = REPO / "docs"
    doc = Document.read_text(docs / "x.md", "# Intro\n\n## Intro\n\n[a](#intro-1) [b](#intro-2)\n[c](cli.md#edge) "
                   "[d](nowhere.md) `[e](nowhere.md)`\n[f](cli.md#nope) [g](https://x/y#z) [h](../README.md#L3) "
                   "[i](../pyproject.toml#L2-L9) [j](../pyproject.toml#deps)\n")
    problems = [(n, t, link_problem(doc, t)) for n, t in doc.links()]
    assert [(n, t) for n, t, p in problems if p] == [(5, "#intro-2"), (6, "nowhere.md"), (7, "cli.md#nope"), (7, "../README.md#L3"),
                                                       (7, "../pyproject.toml#deps")]
    assert resolve_command(["cluster", "up", "--nodes"]) == (("cluster", "up"), None)
    assert resolve_command(["cluster", "down!"]) == (("cluster",), None)
    assert resolve_command(["cluster", "dwn"])[1] == "'dwn' is not a command of noetl-edge cluster"
    spans = Document.read_text(docs / "y.md", "a `noetl-edge playbook\n  register` b ``x `noetl-edge up` y``\n")
    assert list(command_mentions(spans)) == [(1, " playbook register"), (2, " up")]
    soon = {("rewind",)}
    assert command_problem("then `noetl-edge rewind`", " rewind", soon) == "'rewind' is not a command of noetl-edge " \
        "(`noetl-edge rewind` is planned: say so in its paragraph)"
    assert command_problem("Planned: `noetl-edge rewind`", " rewind", soon) is None
    assert command_problem("Planned: `noetl-edge rewind`", " rewind", set()) == "'rewind' is not a command of noetl-edge"
    assert paragraph(["a", "", "b", "c", "", "d"], 4) == "b c"
    fences = Document.read_text(docs / "z.md", "```sh\nx\n``` then prose\n```\n\n~~~\ny\n")
    assert fences.stray_fences == (3, 7)
