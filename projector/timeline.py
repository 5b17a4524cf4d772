"""An execution's history as a timeline: one row per WAL event, with a one-line summary.

The same rows back ``noetl-edge replay`` (table, ``--json``, ``--jsonl``,
``--export``) and the edge's ``GET …/executions/{id}/timeline``.

>>> from locator import new_event
>>> a = new_event(tenant="acme", project="web", execution_id="7", type="step.enter", step="a",
...               payload={"from": None}, ts="2026-11-22T08:00:00.000Z")
>>> b = new_event(tenant="acme", project="web", execution_id="7", type="step.exit", step="a", attempt=1,
...               payload={"result": {"n": 3}}, ts="2026-11-22T08:00:00.250Z")
>>> [(r.seq, r.dt_ms, r.type, r.summary) for r in timeline([WalEvent(4, a), WalEvent(9, b)])]
[(4, None, 'step.enter', 'entered (start)'), (9, 250, 'step.exit', 'result {"n":3}')]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from locator.envelope import Envelope
from projector.fold import WalEvent

if TYPE_CHECKING:
    import pyarrow

SUMMARY_WIDTH = 96
_encode = msgspec.json.Encoder(order="sorted").encode


class TimelineRow(msgspec.Struct, kw_only=True):
    """One event of an execution's history (``dt_ms``: milliseconds since the previous event, by ``ts``)."""

    seq: int
    ts: str
    dt_ms: int | None
    type: str
    step: str | None
    attempt: int | None
    summary: str
    event_id: str
    payload: dict[str, Any]
    result_ref: str | None = None


def parse_ts(ts: str) -> datetime | None:
    """An envelope timestamp as an aware datetime (None if it is not ISO 8601 with a zone)."""
    try:
        value = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else _encode(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def _error(payload: dict[str, Any]) -> str:
    error = payload.get("error", payload)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type")
        return f"{kind}: {error['message']}" if isinstance(kind, str) else error["message"]
    return _short(error)


def _iteration(payload: dict[str, Any]) -> str:
    it = payload.get("iteration")
    return f" [{it}]" if isinstance(it, int) and not isinstance(it, bool) else ""


def _credentials(payload: dict[str, Any]) -> str:
    # Which keychain credential versions the step used (aliases only, never a value).
    used = payload.get("credentials")
    if isinstance(used, list) and used and all(isinstance(u, str) for u in used):
        return " using " + ", ".join(used)
    return ""


def summarize(env: Envelope) -> str:
    """A one-line, human summary of an event (never longer than :data:`SUMMARY_WIDTH`)."""
    p, kind = env.payload, env.type
    if kind == "execution.requested":
        ref = p.get("playbook")
        what = (f"playbook {ref.get('path')} v{ref.get('version', 'latest')}" if isinstance(ref, dict)
                else "no playbook (events only)" if ref is None else f"invalid playbook {_short(ref, 30)}")
        text = f"{what}, workload {_short(p.get('workload', {}), 40)}"
    elif kind == "execution.started":
        ref = p.get("playbook")
        text = f"pinned {ref.get('path')} v{ref.get('version')}" if isinstance(ref, dict) else "started"
    elif kind == "step.enter":
        source = p.get("from")
        text = f"entered from {source}" if isinstance(source, str) else "entered (start)"
        if isinstance(p.get("iterations"), int):
            text += f", {p['iterations']} iterations"
    elif kind == "command.issued":
        text = f"{p.get('kind', '?')} command {p.get('command_id', '?')}" + (
            f", queued for pool {p['pool']}" if isinstance(p.get("pool"), str) else "")
    elif kind == "command.claimed":
        text = f"claimed {env.causation_id or p.get('command_id', '?')}" + (
            f" by {p['worker']}" if isinstance(p.get("worker"), str) else "") + (
            f" in pool {p['pool']}" if isinstance(p.get("pool"), str) else "")
    elif kind == "command.completed" and isinstance(p.get("timer"), str):
        text = f"timer {p['timer']} fired" + _iteration(p)
    elif kind in ("step.exit", "command.completed"):
        text = ("result " + (f"by reference {env.result_ref}" if env.result_ref else _short(p.get("result")))
                + _iteration(p) + _credentials(p))
    elif kind in ("call.error", "step.failed", "execution.failed"):
        text = "error " + _error(p) + _iteration(p) + _credentials(p)
    elif kind == "step.retry":
        text = f"retry as attempt {env.attempt}" + _iteration(p)
    elif kind == "callback.waiting" and isinstance(child := p.get("child"), dict):
        ref = child.get("playbook")
        path = ref.get("path") if isinstance(ref, dict) else "?"
        text = (f"waiting for child {child.get('execution_id')} ({path} in {child.get('project')})"
                + _iteration(p))
    elif kind == "callback.waiting":
        text = f"waiting for a callback, timeout {p.get('timeout_s', '?')}s" + _iteration(p)
    elif kind == "callback.received" and isinstance(child := p.get("child"), dict):
        text = f"child {child.get('execution_id')} {child.get('status')}" + (
            f", result by reference {env.result_ref}" if env.result_ref else
            f", result {_short(p.get('result'))}" if "result" in p else f", error {_short(child.get('error'))}"
        ) + _iteration(p)
    elif kind == "callback.received":
        text = "callback payload " + _short(p.get("payload"))
    elif kind == "execution.cancel_requested":
        text = "cancel requested" + (f" by {p['by']}" if isinstance(p.get("by"), str) else "")
    elif kind in ("execution.completed", "execution.cancelled"):
        text = kind.rpartition(".")[2]
    else:
        text = _short(p) if p else ""
    return _short(text, SUMMARY_WIDTH)


def timeline(events: Iterable[WalEvent], *, previous_ts: str | None = None) -> Iterator[TimelineRow]:
    """A row per event, in WAL order; ``previous_ts`` is the event before the first (for its Δt)."""
    before = parse_ts(previous_ts) if previous_ts else None
    for seq, env in events:
        at = parse_ts(env.ts)
        dt = None if at is None or before is None else round((at - before).total_seconds() * 1000)
        before = at if at is not None else before
        yield TimelineRow(
            seq=seq, ts=env.ts, dt_ms=dt, type=env.type, step=env.step, attempt=env.attempt,
            summary=summarize(env), event_id=env.event_id, payload=env.payload, result_ref=env.result_ref,
        )


def to_arrow(rows: Iterable[TimelineRow]) -> pyarrow.Table:
    """The rows as an Arrow table: seq, ts, dt_ms, type, step, attempt, event_id, payload (JSON text), result_ref.

    >>> to_arrow([]).column_names
    ['seq', 'ts', 'dt_ms', 'type', 'step', 'attempt', 'event_id', 'payload', 'result_ref']
    """
    import pyarrow as pa

    cols: dict[str, list[Any]] = {name: [] for name in _ARROW_SCHEMA}
    for r in rows:
        for name in ("seq", "ts", "dt_ms", "type", "step", "attempt", "event_id", "result_ref"):
            cols[name].append(getattr(r, name))
        cols["payload"].append(_encode(r.payload).decode())
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _ARROW_SCHEMA.items()])
    return pa.Table.from_pydict(cols, schema=schema)


_ARROW_SCHEMA = {
    "seq": "uint64", "ts": "string", "dt_ms": "int64", "type": "string", "step": "string", "attempt": "int32",
    "event_id": "string", "payload": "string", "result_ref": "string",
}
