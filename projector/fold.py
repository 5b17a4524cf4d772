"""The fold: a pure function from (projection | None, events) to a projection.

Each event is applied at most once: an event whose WAL sequence is at or below
the projection's ``last_seq`` is skipped, so at-least-once delivery plus this
guard applies every event exactly once.

>>> from locator import new_event
>>> e = new_event(tenant="acme", project="web", execution_id="7", type="step.enter", step="a", attempt=1)
>>> p = fold(None, [WalEvent(3, e)])
>>> (p.status, p.steps["a"].status, p.last_seq, fold(p, [WalEvent(3, e)]).event_count)
('RUNNING', 'RUNNING', 3, 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from locator.envelope import Envelope
from projector.errors import FoldError
from projector.projection import (
    STEP_TERMINAL,
    TERMINAL,
    USER_EVENTS_KEPT,
    USER_PAYLOAD_BUDGET,
    Projection,
    StepState,
    UserEvent,
    copy_projection,
)


class WalEvent(NamedTuple):
    """An envelope with the WAL sequence it was stored at."""

    seq: int
    env: Envelope


# Execution status set by an event type on a non-terminal execution.
_EXECUTION_STATUS = {
    "execution.started": "RUNNING",
    "step.enter": "RUNNING",
    "command.issued": "RUNNING",
    "command.claimed": "RUNNING",
    "command.completed": "RUNNING",
    "step.exit": "RUNNING",
    "callback.received": "RUNNING",
    "callback.waiting": "WAITING",
    "execution.completed": "COMPLETED",
    "execution.failed": "FAILED",
    "execution.cancelled": "CANCELLED",
}

# Step status set by an event type (None: the event leaves the step's status as it is).
_STEP_STATUS: dict[str, str | None] = {
    "step.enter": "RUNNING",
    "command.issued": "RUNNING",
    "command.claimed": "RUNNING",
    "command.completed": None,
    "step.exit": "COMPLETED",
    "call.error": "ERROR",
    "step.retry": "RETRYING",
    "step.failed": "FAILED",
    "callback.waiting": "WAITING",
    "callback.received": "RUNNING",
}


def new_projection(env: Envelope) -> Projection:
    return Projection(
        execution_id=env.execution_id,
        tenant=env.tenant,
        project=env.project,
        affinity=env.affinity,
        created_at=env.ts,
        updated_at=env.ts,
    )


def _check_identity(p: Projection, env: Envelope) -> None:
    if (env.execution_id, env.tenant, env.project) != (p.execution_id, p.tenant, p.project):
        raise FoldError(
            f"event {env.event_id} of {env.tenant}/{env.project}/{env.execution_id} cannot be folded into "
            f"{p.tenant}/{p.project}/{p.execution_id}"
        )


def _apply_step(p: Projection, env: Envelope, kind: str) -> None:
    assert env.step is not None
    step = p.steps.get(env.step)
    if step is None:
        step = p.steps[env.step] = StepState()
    if env.attempt is not None and env.attempt > step.attempts:
        step.attempts = env.attempt
    status = _STEP_STATUS[kind]
    if status is None or step.status in STEP_TERMINAL:
        # Like an execution's, a step's end is sticky: a late report (a redelivered command, the other
        # iterations of a loop that already failed) is counted but never reopens or rewrites the step.
        return
    step.status = status
    payload = env.payload
    if kind in ("command.issued", "command.claimed"):
        _apply_queue(step, env)
    if status == "RUNNING" and step.started_at is None:
        step.started_at = env.ts
    elif status == "COMPLETED":
        step.queued = msgspec.UNSET
        step.ended_at = env.ts
        step.result = payload.get("result")
        step.result_ref = env.result_ref
        step.error = None
    elif status == "ERROR":
        step.error = payload.get("error", payload or None)
    elif status == "FAILED":
        step.queued = msgspec.UNSET
        step.ended_at = env.ts
        if "error" in payload:
            step.error = payload["error"]


def _apply_queue(step: StepState, env: Envelope) -> None:
    """A command issued to a pool waits there until a worker's first claim of it (delivery 1).

    A claim of a later delivery is the same command again (its worker died), not one more taken off
    the queue; a command whose first delivery died before claiming stays counted until the step ends.
    """
    payload = env.payload
    if env.type == "command.issued":
        pool = payload.get("pool")
        if isinstance(pool, str):
            step.pool = pool
            step.queued = (0 if isinstance(step.queued, msgspec.UnsetType) else step.queued) + 1
    elif isinstance(step.queued, int) and payload.get("delivery", 1) == 1:
        step.queued = step.queued - 1 or msgspec.UNSET


def _apply_links(p: Projection, env: Envelope) -> None:
    """A child execution's ``parent``, and the ``children`` a playbook step started (with how they ended)."""
    payload = env.payload
    if env.type == "execution.requested":
        parent = payload.get("parent")
        if isinstance(parent, dict):
            p.parent = {k: parent.get(k) for k in ("execution_id", "project", "affinity", "step", "iteration")}
        return
    child = payload.get("child")
    if not isinstance(child, dict) or not isinstance(child.get("execution_id"), str):
        return
    children = [] if p.children is msgspec.UNSET else p.children
    link = next((c for c in children if c.get("execution_id") == child["execution_id"]), None)
    if env.type == "callback.waiting" and link is None:
        children.append({
            "execution_id": child["execution_id"], "project": child.get("project"), "affinity": child.get("affinity"),
            "step": env.step, "iteration": payload.get("iteration"), "attempt": env.attempt, "status": "STARTED",
        })
        p.children = children
    elif env.type == "callback.received" and link is not None and isinstance(child.get("status"), str):
        link["status"] = child["status"]


_payload_json = msgspec.json.Encoder()


def _bound_user_payloads(kept: list[UserEvent]) -> None:
    """Omit the payloads that do not fit :data:`USER_PAYLOAD_BUDGET`, counted from the newest event back.

    Walking newest to oldest and summing ``payload_bytes``, the first event that would overflow the
    budget and every older one lose their payload. A newer event only adds to the sums of older ones,
    so an omitted payload is never needed again and the omitted events are always the oldest: the
    outcome is a function of the kept events alone, the same whether applied after every event or once
    after a batch, and folding in any number of batches equals folding at once. A kept event without a
    size (stored before sizes were recorded) is measured first.
    """
    total = 0
    for event in reversed(kept):
        if event.payload_omitted:
            return  # and so is every older one
        if event.payload_bytes == 0:
            event.payload_bytes = len(_payload_json.encode(event.payload))
        total += event.payload_bytes
        if total > USER_PAYLOAD_BUDGET:  # the total only grows: every older one is over too
            event.payload, event.payload_omitted = {}, True


def _apply(p: Projection, seq: int, env: Envelope) -> None:
    kind = env.type
    if kind.startswith("user."):
        p.user_event_count += 1
        size = len(_payload_json.encode(env.payload))
        p.user_events.append(UserEvent(seq=seq, type=kind, ts=env.ts, payload=env.payload, payload_bytes=size))
        if len(p.user_events) > USER_EVENTS_KEPT:
            del p.user_events[0]
    elif kind == "execution.requested":
        payload: dict[str, Any] = env.payload
        # Anyone can publish this event: a playbook reference or workload that is not an object is
        # folded as absent (the orchestrator fails such an execution; the WAL keeps what was sent).
        playbook, workload = payload.get("playbook"), payload.get("workload")
        p.playbook = playbook if isinstance(playbook, dict) else None
        p.workload = workload if isinstance(workload, dict) else {}
    elif kind == "execution.cancel_requested":
        p.cancel_requested = True
    elif kind == "execution.completed" and p.status not in TERMINAL:
        if "result" in env.payload:
            p.result = env.payload["result"]
        if env.result_ref is not None:
            p.result_ref = env.result_ref
    if kind in ("execution.requested", "callback.waiting", "callback.received"):
        _apply_links(p, env)
    if kind in _STEP_STATUS and env.step is not None:
        _apply_step(p, env, kind)
    status = _EXECUTION_STATUS.get(kind)
    if status is not None and p.status not in TERMINAL:
        p.status = status
        if status == "FAILED":
            p.error = env.payload.get("error", env.payload or None)
    p.last_seq = seq
    p.event_count += 1
    p.updated_at = env.ts


def fold(projection: Projection | None, events: Iterable[WalEvent]) -> Projection | None:
    """Apply ``events`` (in WAL order) to a copy of ``projection``; the input is never mutated.

    Returns None only when there is no projection and no event to create one.
    Raises :class:`FoldError` if an event belongs to another execution.
    """
    p = None if projection is None else copy_projection(projection)
    for seq, env in events:
        if p is None:
            p = new_projection(env)
        else:
            if seq <= p.last_seq:
                continue
            _check_identity(p, env)
        _apply(p, seq, env)
    if p is not None and p.user_events:
        _bound_user_payloads(p.user_events)
    return p
