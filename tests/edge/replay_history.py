"""Known histories for the replay tests: fixed ids and timestamps, so their output is stable."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from locator import new_event
from locator.envelope import Envelope

TENANT, PROJECT, EXECUTION = "golden", "replay", "4242"
T0 = datetime(2026, 11, 22, 8, 0, 0, tzinfo=UTC)


def _ts(ms: int) -> str:
    return (T0 + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def golden_history() -> list[Envelope]:
    """A two-step run with a retry, a stored result, a secret in a user event and Δt from 0 ms to minutes."""
    e = EXECUTION
    spec: list[tuple[int, str, dict[str, Any]]] = [
        (0, "execution.requested", {"payload": {"playbook": {"path": "demo/two", "version": 1}, "workload": {"n": 3}}}),
        (6, "execution.started", {"payload": {"playbook": {"path": "demo/two", "version": 1}, "workload": {"n": 3}}}),
        (6, "step.enter", {"step": "fetch", "payload": {"from": None}}),
        (7, "command.issued", {"step": "fetch", "attempt": 1,
                               "payload": {"command_id": f"{e}:fetch:-:1", "iteration": None, "kind": "http"}}),
        (9, "command.claimed", {"step": "fetch", "attempt": 1, "causation_id": f"{e}:fetch:-:1",
                                "payload": {"worker": "w1"}}),
        (1209, "step.exit", {"step": "fetch", "attempt": 1, "causation_id": f"{e}:fetch:-:1",
                             "payload": {"result": {"rows": 3, "status": 200}}}),
        (1211, "step.enter", {"step": "load", "payload": {"from": "fetch"}}),
        (1212, "command.issued", {"step": "load", "attempt": 1,
                                  "payload": {"command_id": f"{e}:load:-:1", "iteration": None, "kind": "python"}}),
        (1500, "call.error", {"step": "load", "attempt": 1, "causation_id": f"{e}:load:-:1",
                              "payload": {"command_id": f"{e}:load:-:1",
                                          "error": {"type": "timeout", "message": "no answer in 0.25s"}}}),
        (1502, "step.retry", {"step": "load", "attempt": 2, "payload": {"iteration": None}}),
        (1503, "command.issued", {"step": "load", "attempt": 2,
                                  "payload": {"command_id": f"{e}:load:-:2", "iteration": None, "kind": "python"}}),
        (65000, "user.audit.note", {"payload": {"by": "ada", "db_password": "hunter2"}}),
        (125503, "step.exit", {"step": "load", "attempt": 2, "causation_id": f"{e}:load:-:2",
                               "result_ref": f"noetl://{TENANT}/{PROJECT}/executions/{e}/results/load/2",
                               "payload": {"result": None, "result_bytes": 123456}}),
        (125510, "execution.completed", {"payload": {}}),
    ]
    return [
        new_event(tenant=TENANT, project=PROJECT, execution_id=e, type=kind, ts=_ts(ms), event_id=f"golden-{i:02d}", **kw)
        for i, (ms, kind, kw) in enumerate(spec)
    ]


def long_history(count: int, *, execution_id: str, seed: int = 7) -> list[Envelope]:
    """``count`` events of one execution: steps entered, issued, claimed, retried, failed and exited, user events."""
    rnd = random.Random(seed)
    out = [new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type="execution.requested",
                     payload={"playbook": None, "workload": {"seed": seed}}, ts=_ts(0), event_id=f"{execution_id}-0")]
    kinds = ["step.enter", "command.issued", "command.claimed", "step.exit", "call.error", "step.retry",
             "step.failed", "user.metric", "callback.waiting", "callback.received", "command.completed"]
    for i in range(1, count - 1):
        kind = rnd.choice(kinds)
        step = None if kind.startswith("user.") else f"s{rnd.randrange(12)}"
        payload: dict[str, Any] = {"i": i}
        if kind in ("step.exit", "command.completed"):
            payload["result"] = {"value": rnd.randrange(1000)}
        if kind in ("call.error", "step.failed"):
            payload["error"] = {"type": "boom", "message": f"failure {i}"}
        out.append(new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type=kind, step=step,
                             attempt=rnd.randint(1, 3) if step else None, payload=payload,
                             ts=_ts(i * 7), event_id=f"{execution_id}-{i}"))
    out.append(new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type="execution.completed",
                         ts=_ts(count * 7), event_id=f"{execution_id}-{count - 1}"))
    return out
