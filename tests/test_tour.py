"""The README's "A 5-minute tour", run as written: its ``sh`` and ``python`` blocks in order, against a real
``noetl-edge up`` started by the tour's own first block, in a copy of the repository.

What the test changes in a snippet is only what must differ on a test machine, by the rules in
:data:`RULES` (each must match somewhere, so a README edit that drops its target fails here): the HTTP and
NATS ports the test chose, and the execution ids and callback path that earlier steps printed. The rest
of the environment is a new user's second terminal: no virtualenv on ``PATH``, ``HOME`` a fresh directory
(a snippet that still reads ``~/.local/share`` finds nothing), ``NOETL_DATA_DIR`` as given to ``up``, and
``NOETL_NATS_URL`` for the other port, as the README asks for.

An HTML comment on the line before a block tells the test how to run it:

- ``<!-- tour: retry -->``: a read of what the kernel writes "within a second or two": run again until it
  exits 0 and its check passes;
- ``<!-- tour: background until /REGEX/ -->``: started and left running (the README runs it in another
  terminal); after the next block, the test waits for REGEX in its output, then presses Ctrl-C if it is
  still running (an ``until`` that ends by itself must have exited 0);
- ``<!-- tour: exit N -->``: the block exits with N instead of 0;
- ``<!-- tour: skip -->``: not run (none in the tour today).

Shell blocks share their variables as one terminal would (each block's assignments are carried to the
next); every block runs under ``set -e``. Each block but the one that only sets ``DATA`` and ``TOUR`` has
a check of its output in :data:`CHECKS` (against what the README shows, where that is stable), and the
copy's files are the same before and after: the tour writes nothing in the repository.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.feather as feather
import pytest

from natscluster.server import free_port
from tests.test_readme import fresh_copy

REPO = Path(__file__).resolve().parent.parent
WAIT = 120.0  # seconds a retried block, a background output or `up` may take on a loaded 2-core host

BLOCK = re.compile(r"(?:<!-- tour: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)\n```\n", re.S)
ASSIGNED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=", re.M)


@dataclass
class Block:
    """One fenced block of the tour: a snippet to run (``sh``/``python``) and the output shown after it."""

    lang: str
    body: str
    marker: str
    shown: str = ""


def tour_blocks() -> list[Block]:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## A 5-minute tour\n")
    tour = text[start : text.index("\n## ", start + 1) + 1]
    blocks: list[Block] = []
    for m in BLOCK.finditer(tour):
        if m.group("lang") in ("sh", "python"):
            blocks.append(Block(m.group("lang"), m.group("body"), m.group("marker") or ""))
        elif blocks and not blocks[-1].shown:
            blocks[-1].shown = m.group("body")
    return blocks


@dataclass
class Background:
    proc: subprocess.Popen[bytes]
    out: Path
    until: re.Pattern[str]

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ended = self.proc.poll() is not None
            if found := pattern.search(self.text()):
                return found
            if ended:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern.pattern!r} in the output of a background block:\n{self.text()}")

    def finish(self) -> None:
        """Wait for ``until``, then Ctrl-C what still runs; one that ended by itself must have exited 0."""
        self.wait_for(self.until)
        try:
            self.proc.wait(timeout=5)  # a `run --wait` prints the projection after its last line and exits
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)
        else:
            assert self.proc.returncode == 0, self.text()


@dataclass
class Tour:
    """The second terminal: the copy to run in, its environment, the shell variables carried between blocks."""

    root: Path
    scratch: Path
    env: dict[str, str]
    http: int
    nats: int
    outputs: list[tuple[Block, str]] = field(default_factory=list)
    background: list[Background] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def script(self, block: Block) -> str:
        # `NAME=value command` sets nothing in the shell: declare -p finds no such variable, and that is fine.
        keep = "".join(f'declare -p {name} >> "$TOUR_STATE" 2>/dev/null || true\n'
                       for name in sorted(set(ASSIGNED.findall(block.body))))
        return f'set -e\nsource "$TOUR_STATE"\n{block.body}\n{keep}'

    def start(self, block: Block, until: str) -> None:
        out = self.scratch / f"background-{len(self.background)}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                ["bash", "-c", self.script(block)], cwd=self.root, env=self.env, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.background.append(Background(proc, out, re.compile(until, re.M)))

    def run(self, block: Block) -> subprocess.CompletedProcess[str]:
        if block.lang == "python":
            path = self.scratch / "snippet.py"
            path.write_text(block.body)
            argv = [str(self.root / ".venv" / "bin" / "python"), str(path)]
        else:
            argv = ["bash", "-c", self.script(block)]
        return subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=WAIT)

    def output_of(self, needle: str) -> str:
        return next(out for block, out in self.outputs if needle in block.body)

    def background_of(self, needle: str) -> Background:
        return next(b for b in self.background if needle in str(b.proc.args))


def execution_id(output: str) -> str:
    return str(json.loads(output.splitlines()[0])["execution_id"])


def callback_path(tour: Tour) -> str:
    # The background `run --wait` of callback.yaml prints the path once the step waits.
    waiting = re.compile(r"step approval WAITING callback=(/api/v1/callbacks/\S+)")
    return tour.background_of("examples/playbooks/callback.yaml").wait_for(waiting).group(1)


# (pattern in a block's text, what replaces each match): what must differ on a test machine.
RULES: list[tuple[str, Callable[[Tour], str]]] = [
    (r"127\.0\.0\.1:8080", lambda t: f"127.0.0.1:{t.http}"),
    (r"127\.0\.0\.1:4222", lambda t: f"127.0.0.1:{t.nats}"),
    (r"^LINEAR=\d+$", lambda t: "LINEAR=" + execution_id(t.output_of("examples/playbooks/linear.yaml"))),
    (r"^BIG=\d+$", lambda t: "BIG=" + execution_id(t.output_of("examples/playbooks/big_result.yaml"))),
    (r"/api/v1/callbacks/[A-Za-z0-9_.-]+", callback_path),
]


def substitute(tour: Tour, block: Block) -> Block:
    body = block.body
    for pattern, value in RULES:
        if re.search(pattern, body, re.M):
            tour.used.add(pattern)
            replacement = value(tour)
            body = re.sub(pattern, lambda _: replacement, body, flags=re.M)
    return Block(block.lang, body, block.marker, block.shown)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def headers_and_body(output: str) -> tuple[str, dict[str, object]]:
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    return head.lower(), json.loads(body)


# (text that picks the block, check of its stdout against the output the README shows after it).
def check_locate(out: str, shown: str) -> None:
    assert json.loads(out) == json.loads(shown)


def check_publish_42(out: str, shown: str) -> None:
    got = json.loads(out)
    assert (got["execution_id"], got["event_id"], got["duplicate"]) == ("42", "note-1", False)


def check_sse_publish(out: str, shown: str) -> None:
    assert [a["subject"].split(".", 5)[-1] for a in json.loads(out)["acks"]] == ["user.note", "execution.completed"]


def check_publish_one(out: str, shown: str) -> None:
    got, want = json.loads(out), json.loads(shown)
    assert got.keys() == want.keys() and got["stream"] == "WAL_3" and got["duplicate"] is False
    assert got["subject"] == f"wal.3.acme.web.{got['execution_id']}.user.note"


def check_equal_json(out: str, shown: str) -> None:
    assert json.loads(out) == json.loads(shown)


def check_raw(out: str, shown: str) -> None:
    lines = out.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["wal.3.acme.web.42.user.note", "in.acme.web.42.user.note"]
    assert all(re.fullmatch(r"\S+ -> WAL_3 \d+", line) for line in lines), out


def check_1001(out: str, shown: str) -> None:
    head, body = headers_and_body(out)
    assert head.startswith("http/1.1 200") and "x-noetl-source: snapshot" in head, head
    want = headers_and_body(shown)[1]
    assert body.keys() == want.keys() and body["status"] == "COMPLETED"
    assert body["steps"]["greet"]["result"] == "hello world"  # type: ignore[index]


def check_2001(out: str, shown: str) -> None:
    head, body = headers_and_body(out)
    assert head.startswith("http/1.1 200") and "x-noetl-source: cache" in head, head
    assert (body["status"], body["affinity"], body["event_count"]) == ("RUNNING", "eu", 2)


def check_read(out: str, shown: str) -> None:
    # The segment row depends on what else the kernel materialized with 1001 during the tour.
    assert re.sub(r"segment row \d+", "segment row N", out) == re.sub(r"segment row \d+", "segment row N", shown + "\n")


def check_rows(out: str, shown: str) -> None:
    # The snippet prints dict reprs; an execution's last row printed is its newest.
    rows = {row["execution_id"]: row for row in map(ast.literal_eval, out.splitlines())}
    for want in map(ast.literal_eval, shown.splitlines()):
        got = rows[want["execution_id"]]
        assert got.keys() == want.keys() and {**got, "last_seq": 0} == {**want, "last_seq": 0}, out


def check_start(out: str, shown: str) -> None:
    got = json.loads(out)
    assert got.keys() == json.loads(shown).keys() and got["stream"] == "WAL_3"


def check_acks(out: str, shown: str) -> None:
    assert [a["subject"].rsplit(".", 2)[-2:] for a in json.loads(out)["acks"]] == [["step", "enter"], ["step", "exit"]]


def check_min_seq(out: str, shown: str) -> None:
    head, body = headers_and_body(out)
    assert head.startswith("http/1.1 200"), head
    assert body["steps"]["greet"]["result"] == "hello tour" and body["workload"] == {"name": "tour"}  # type: ignore[index]


def check_metrics(out: str, shown: str) -> None:
    names = {line.split("{")[0] for line in out.splitlines()}
    assert names == {line.split("{")[0] for line in shown.splitlines()}, out


def check_run(out: str, shown: str) -> None:
    lines = out.splitlines()
    assert re.fullmatch(r"execution \d+ COMPLETED", lines[-2]) and json_lines(out)[-1]["status"] == "COMPLETED", out


def check_linear_events(out: str, shown: str) -> None:
    types = [e["event"]["type"] for e in json.loads(out)["events"]]
    assert types[:2] == ["execution.requested", "execution.started"] and types[-1] == "execution.completed", types
    assert types.count("step.exit") == 3 and types.count("command.claimed") == 3, types


def check_big_result(out: str, shown: str) -> None:
    assert "result_ref=noetl://results/acme/web/" in out and json_lines(out)[-1]["status"] == "COMPLETED", out


def check_fetch(out: str, shown: str) -> None:
    assert out.startswith(("[", "{")), out[:300]  # the first 200 bytes of the JSON; the Arrow files: at the end


def check_callback(out: str, shown: str) -> None:
    got = json.loads(out)
    assert (got["step"], got["status"]) == ("approval", "RECEIVED")


def check_replay(out: str, shown: str) -> None:
    # Piped, the table wraps to the pipe's width: read it with the wrapping undone.
    flat = re.sub(r"\s+", " ", out)
    assert re.match(r"noetl://acme/web/executions/\d+ · shard 3 · 15 events · ", flat), out
    assert all(f" step.exit {step} 1 " in flat for step in ("first", "second", "third")), out


def check_register(out: str, shown: str) -> None:
    assert json.loads(out) | {"created": True} == {
        "tenant": "acme", "project": "web", "path": "examples/linear", "version": 2, "created": True}


def check_diverged(out: str, shown: str) -> None:
    # The acceptance: exit 3 (the block's marker) with the diverging event named.
    assert re.search(r"^check: DIVERGED at seq \d+ \(step\.exit of step first\): ", out, re.M), out
    assert re.search(r"^- recorded at seq \d+: step\.enter step second ", out, re.M), out
    assert re.search(r"^\+ examples/linear v2 decides: step\.enter step third ", out, re.M), out


CHECKS: list[tuple[str, Callable[[str, str], None]]] = [
    ("noetl-edge locate --tenant acme --project web", check_locate),
    ("--type user.note --payload '{\"text\":\"hi\"}'\n", check_publish_one),
    ("--execution-id 42 --event-id note-1", check_publish_42),
    ('publish --file "$TOUR/events.jsonl"', check_equal_json),
    ("publish --file examples/events.jsonl", check_equal_json),
    ('for subject in ("wal.3.acme.web.42.user.note"', check_raw),
    ("executions/1001", check_1001),
    ("executions/2001?affinity=eu", check_2001),
    ('for execution_id in ("1001", "2001")', check_read),
    ("drop_columns", check_rows),
    ('tee "$TOUR/start.json"', check_start),
    ('tee "$TOUR/acks.json"', check_acks),
    ("?min_seq=$SEQ", check_min_seq),
    ('"api_key":"abc123"', check_sse_publish),
    ("/metrics", check_metrics),
    ("examples/playbooks/linear.yaml", check_run),
    ("$API/$LINEAR/events", check_linear_events),
    ("examples/playbooks/loop.yaml", check_run),
    ("examples/playbooks/big_result.yaml", check_big_result),
    ("steps/rows/result | head -c 200", check_fetch),
    ("/api/v1/callbacks/", check_callback),
    ("replay noetl://acme/web/executions/$LINEAR\n", check_replay),
    ("playbook register examples/playbooks/linear-v2.yaml", check_register),
    ("--check --against-version 2", check_diverged),
]


def check_for(block: Block) -> tuple[str, Callable[[str, str], None]] | None:
    found = [(needle, check) for needle, check in CHECKS if needle in block.body + "\n"]
    assert len(found) <= 1, block.body
    return found[0] if found else None


def marker(block: Block, name: str) -> str | None:
    m = re.fullmatch(rf"{name}(?: (.*))?", block.marker)
    return None if m is None else (m.group(1) or "")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Tour]:
    """The tour's first block, `up`, in a copy of the repository (the venv linked in), on free ports."""
    root = fresh_copy(tmp_path / "project")
    (root / ".venv").symlink_to(REPO / ".venv")
    scratch, home, tmp = tmp_path / "scratch", tmp_path / "home", tmp_path / "tmp"
    for d in (scratch, home, tmp):
        d.mkdir()
    (scratch / "state.sh").write_text("")
    nats, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "VIRTUAL_ENV", "PYTHON", "XDG_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "NOETL_DATA_DIR": str(tmp_path / "data"),
            "TOUR_STATE": str(scratch / "state.sh"), "NOETL_LOG_FORMAT": "json"}
    first = tour_blocks()[0]
    assert first.lang == "sh" and first.body.endswith("noetl-edge up"), first.body
    with (tmp_path / "up.log").open("w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", first.body], cwd=root, env=env | {"NOETL_NATS_PORT": str(nats), "NOETL_HTTP_PORT": str(http)},
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
        )
    tour = Tour(root, scratch, env | {"NOETL_NATS_URL": f"nats://127.0.0.1:{nats}"}, http, nats)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"ready nats://127.0.0.1:{nats} http://127.0.0.1:{http}", (tmp_path / "up.log").read_text()
        yield tour
        # The tour's last words: stop `up` with Ctrl-C.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, (tmp_path / "up.log").read_text()[-3000:]
    finally:
        for b in tour.background:
            if b.proc.poll() is None:
                os.killpg(b.proc.pid, signal.SIGKILL)
                b.proc.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def files(root: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".venv")]
        found |= {os.path.relpath(os.path.join(dirpath, f), root) for f in filenames}
    return found


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(up: Tour) -> None:
    tour = up
    before = files(tour.root)
    unchecked: list[str] = []
    checked: list[str] = []
    waiting: list[Background] = []
    for written in tour_blocks()[1:]:
        if marker(written, "skip") is not None:
            continue
        block = substitute(tour, written)
        if (until := marker(block, "background until")) is not None:
            assert until.startswith("/") and until.endswith("/"), block.marker
            tour.start(block, until[1:-1])
            waiting.append(tour.background[-1])
            continue
        expect = int(marker(block, "exit") or 0)
        found = check_for(written)
        deadline = time.monotonic() + WAIT
        while True:
            proc = tour.run(block)
            try:
                assert proc.returncode == expect, f"exit {proc.returncode}, not {expect}:\n{proc.stdout}\n{proc.stderr}"
                if found is not None:
                    found[1](proc.stdout, written.shown)
                break
            except AssertionError as e:
                if marker(block, "retry") is None or time.monotonic() > deadline:
                    raise AssertionError(f"tour block failed:\n{block.body}\n{e}") from None
                time.sleep(0.5)
        tour.outputs.append((written, proc.stdout))
        if found is None:
            unchecked.append(written.body)
        else:
            checked.append(found[0])
        for b in waiting:
            b.finish()
        waiting.clear()
    assert not waiting, "a background block is the tour's last"
    assert sorted(checked) == sorted(needle for needle, _ in CHECKS), "each check found its one block"
    assert tour.used == {pattern for pattern, _ in RULES}, "every substitution rule matched a block"
    assert [b.split("\n")[0] for b in unchecked] == ["DATA=${NOETL_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/noetl-edge}"]
    assert files(tour.root) == before, "the tour writes nothing in the repository"
    # The SSE stream saw the execution's events, the credential masked.
    stream = tour.background_of("/stream").text()
    assert "event: execution.completed" in stream and '"api_key":"***"' in stream and "abc123" not in stream
    # The big result as an Arrow file, over HTTP and with `result --out`: the same table.
    (scratch,) = (tour.scratch.parent / "tmp").iterdir()  # TOUR=$(mktemp -d) under the test's TMPDIR
    assert feather.read_table(scratch / "rows.feather").equals(feather.read_table(scratch / "rows2.feather"))
    assert feather.read_table(scratch / "rows.feather").num_rows > 0
