"""What ``noetl-edge replay`` prints: the timeline table, JSON, state, diff, the check report, the export.

Payloads, states and summaries are masked by the same scrub as the edge's
responses (credentials never reach a terminal or a file); ``--check`` works on
the raw events.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from edge.cli.output import EXIT_OK
from kernel.errors import KernelError
from kernel.scrub import scrub, scrub_envelope
from locator.urn import Urn
from projector.diff import Change, diff_projections
from projector.fold import WalEvent, fold
from projector.projection import Projection
from projector.timeline import TimelineRow, timeline, to_arrow
from system_playbooks.orchestrate.check import CheckReport, Decision

PROGRESS_MIN = 2000  # a bar only for histories at least this long
_STYLES = {
    "execution.": "bold cyan", "step.enter": "blue", "step.exit": "green", "command.": "dim", "call.error": "red",
    "step.failed": "bold red", "execution.failed": "bold red", "step.retry": "yellow", "callback.": "magenta",
    "user.": "white",
}
_json = msgspec.json.Encoder(order="sorted")


PIPED_WIDTH = 200  # stdout is not a terminal and COLUMNS is unset: rich's 80 would cut type names


def _stdout() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPED_WIDTH
    return console


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def note(text: str) -> None:
    """One line for the human on stderr (never mixed into stdout's tables or JSON)."""
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback for :func:`projector.replay.history`: a bar on a terminal, for long histories only."""
    console = _stderr()
    if not console.is_terminal:
        yield lambda read, total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task: list[Any] = []

        def update(read: int, total: int) -> None:
            if not task and total >= PROGRESS_MIN:
                task.append(bar.add_task(label, total=total))
            if task:
                bar.update(task[0], completed=read, total=max(total, read))

        yield update


def _style(kind: str) -> str:
    return next((style for prefix, style in _STYLES.items() if kind.startswith(prefix)), "")


def _dt(ms: int | None) -> str:
    if ms is None:
        return ""
    if abs(ms) < 1000:
        return f"+{ms}ms"
    if abs(ms) < 60_000:
        return f"+{ms / 1000:.1f}s"
    return f"+{ms // 60_000}m{(ms % 60_000) // 1000:02d}s"


def _scrubbed(events: list[WalEvent]) -> list[TimelineRow]:
    return list(timeline(WalEvent(s, scrub_envelope(e)) for s, e in events))


def _states(events: list[WalEvent]) -> Iterator[Projection]:
    """The projection after each event."""
    p: Projection | None = None
    for event in events:
        p = fold(p, [event])
        assert p is not None
        yield p


def _state_at(events: list[WalEvent], seq: int) -> Projection | None:
    return fold(None, (e for e in events if e.seq <= seq))


def _changes_text(changes: list[Change]) -> str:
    skip = {"last_seq", "event_count", "updated_at"}
    parts = [f"{c.path}={_json.encode(scrub(c.after)).decode()}" for c in changes if c.path not in skip]
    text = "; ".join(parts)
    return text if len(text) <= 120 else text[:119] + "…"


def _table(urn: Urn, shard: int, rows: list[TimelineRow], changes: list[str] | None) -> Table:
    date = rows[0].ts[:10] if rows else ""
    table = Table(title=f"{urn} · shard {shard} · {len(rows)} events · {date}", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("seq", "right"), ("time", "left"), ("Δt", "right"), ("type", "left"), ("step", "left"),
                          ("att", "right"), ("summary", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name == "summary" else "ellipsis")  # type: ignore[arg-type]
    if changes is not None:
        table.add_column("changes", overflow="fold")
    for i, r in enumerate(rows):
        cells: list[str | Text] = [str(r.seq), r.ts[11:23], _dt(r.dt_ms), Text(r.type, style=_style(r.type)), r.step or "",
                 "" if r.attempt is None else str(r.attempt), r.summary]
        table.add_row(*cells, *([changes[i]] if changes is not None else []))
    return table


def _diff(events: list[WalEvent], a: int, b: int) -> dict[str, Any]:
    changes = diff_projections(_state_at(events, a), _state_at(events, b))
    return {"from_seq": a, "to_seq": b, "changes": [msgspec.to_builtins(c) for c in changes]}


def _decision_line(d: Decision) -> str:
    attempt = f" attempt {d.attempt}" if d.attempt is not None else ""
    step = f" step {d.step}" if d.step is not None else ""
    return f"{d.type}{step}{attempt} {_json.encode(scrub(d.payload)).decode()}  ({d.event_id})"


def _print_check(report: CheckReport) -> None:
    pb = f"{report.playbook['path']} v{report.playbook['version']}"
    d = report.divergence
    if d is None:
        print(f"check: OK: {report.decisions} recorded decisions are what {pb} decides ({report.events} events)")
        for want in report.pending:
            print(f"  would decide next (not recorded yet): {_decision_line(want)}")
        return
    cause = f" ({d.input.type}{f' of step {d.input.step}' if d.input.step else ''})" if d.input is not None else ""
    print(f"check: DIVERGED at seq {d.seq}{cause}: {d.reason}")
    print(f"- recorded at seq {d.recorded.seq}: {_decision_line(d.recorded)}")
    for want in d.expected:
        print(f"+ {pb} decides: {_decision_line(want)}")
    if not d.expected:
        print(f"+ {pb} decides: nothing more at this point")
    print(f"  ({report.decisions} recorded decisions matched before it)")


def show(urn: Urn, shard: int, events: list[WalEvent], args: argparse.Namespace, report: CheckReport | None) -> int:
    """Print the timeline and what was asked for; returns the exit code."""
    rows = _scrubbed(events)
    each = list(_states(events)) if args.state == "each" else None
    shown = [i for i, r in enumerate(rows) if args.step is None or r.step == args.step]
    final = fold(None, events) if args.state == "end" else None
    diff = _diff(events, *args.diff) if args.diff is not None else None
    if args.json or args.jsonl:
        docs = []
        for i in shown:
            doc = msgspec.to_builtins(rows[i])
            if each is not None:
                doc["state"] = scrub(msgspec.to_builtins(each[i]))
            docs.append(doc)
        extra: dict[str, Any] = {}
        if final is not None:
            extra["state"] = scrub(msgspec.to_builtins(final))
        if diff is not None:
            extra["diff"] = scrub(diff)
        if report is not None:
            extra["check"] = scrub(msgspec.to_builtins(report))
        if args.jsonl:
            for doc in docs:
                sys.stdout.write(_json.encode(doc).decode() + "\n")
            for key, value in extra.items():
                sys.stdout.write(_json.encode({key: value}).decode() + "\n")
        else:
            execution = {"urn": str(urn), "tenant": urn.tenant, "project": urn.project, "affinity": urn.affinity,
                         "execution_id": urn.execution_id, "shard": shard}
            sys.stdout.write(_json.encode({"execution": execution, "rows": docs, **extra}).decode() + "\n")
        return EXIT_OK
    changes = None
    if each is not None:
        changes = [_changes_text(diff_projections(each[i - 1] if i else None, each[i])) for i in shown]
    console = _stdout()
    console.print(_table(urn, shard, [rows[i] for i in shown], changes))
    if final is not None:
        print(f"state at seq {final.last_seq}:")
        print(msgspec.json.format(_json.encode(scrub(msgspec.to_builtins(final))), indent=2).decode())
    if diff is not None:
        table = Table(title=f"projection from seq {diff['from_seq']} to seq {diff['to_seq']}", box=box.SIMPLE_HEAD,
                      title_justify="left")
        for name in ("field", "at " + str(diff["from_seq"]), "at " + str(diff["to_seq"])):
            table.add_column(name, overflow="fold")
        for c in diff["changes"]:
            table.add_row(c["path"], *(_json.encode(scrub(c[k])).decode() for k in ("before", "after")))
        console.print(table if diff["changes"] else "no change in the projection between those sequences")
    if report is not None:
        _print_check(report)
    return EXIT_OK


def follow_row(row: TimelineRow, *, jsonl: bool) -> None:
    """One followed event (its payload already masked) as a table-like line or a JSON line."""
    if jsonl:
        sys.stdout.write(_json.encode(row).decode() + "\n")
    else:
        _stdout().print(
            f"{row.seq:>8} {row.ts[11:23]} {_dt(row.dt_ms):>8} ",
            Text(f"{row.type:<22}", style=_style(row.type)),
            f"{row.step or '':<16} {'' if row.attempt is None else row.attempt:>3} {row.summary}",
        )
    sys.stdout.flush()


def export(events: list[WalEvent], args: argparse.Namespace) -> None:
    from pyarrow import feather

    rows = [r for r in _scrubbed(events) if args.step is None or r.step == args.step]
    path = Path(args.export)
    try:
        feather.write_feather(to_arrow(rows), str(path))
    except OSError as e:
        raise KernelError(f"cannot write {path}: {e.strerror or e}") from e
    note(f"wrote {path} ({len(rows)} events, {path.stat().st_size} bytes)")
