"""What the orchestrator knows of one execution: a fold of its WAL events, richer than the projection.

The projection (``projector``) is the public read model; this state is the
orchestrator's private one: per step, per loop iteration, which attempt was
issued, what came back, and which routing decisions were already recorded.
It is built only from WAL events, so any kernel can rebuild it from the
execution's history and reach the same decisions (see :mod:`.planner`).

Events are applied at most once: an event at or below ``last_seq``, or one
the orchestrator already applied when it emitted it (``ahead``), is skipped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from locator.command import command_id
from locator.envelope import Envelope

# Iteration statuses.
PENDING, ISSUED, WAITING, DONE, ERROR, RETRYING, FAILED = (
    "PENDING", "ISSUED", "WAITING", "DONE", "ERROR", "RETRYING", "FAILED",
)
# Step statuses (the orchestrator's view).
ENTERED, COMPLETED = "ENTERED", "COMPLETED"
NOT_LOOP = -1  # the iteration key of a step that is not a loop
# The ``worker`` of a ``command.claimed`` that system/orchestrate published itself (see :mod:`.inline`).
INLINE_WORKER = "inline"


class IterationState(msgspec.Struct, kw_only=True):
    status: str = PENDING
    attempt: int = 0  # the highest attempt seen on this iteration's events
    issued: int = 0  # the highest attempt the orchestrator issued
    result: Any = None
    result_ref: str | None = None
    error: Any = None
    token: str | None = None  # a callback step's one-time token
    received: bool = False  # the callback arrived (its payload is in ``result``)
    timed_out: int = 0  # the attempt whose callback timer fired
    retry_due: int = 0  # the attempt a step.retry announced (0: none pending)
    retry_ready: int = 0  # the attempt whose backoff timer fired
    claimed: bool = False  # a worker reported it started the issued attempt
    inline: bool = False  # that claim was the orchestrator's own: it runs the step inline (no worker holds it)
    since_ms: int = 0  # when the current issue, wait or retry was recorded (epoch ms)
    child: str | None = None  # a playbook step's child execution being waited for
    child_status: str | None = None  # how it ended (COMPLETED, FAILED, CANCELLED), once its end arrived


class ChildRef(msgspec.Struct, kw_only=True):
    """Where a child execution a step started lives, and the step attempt (command id) it answers."""

    command_id: str
    project: str
    affinity: str = ""


class StepRun(msgspec.Struct, kw_only=True):
    status: str = PENDING  # PENDING, ENTERED, COMPLETED, FAILED
    entered_from: str | None = None
    count: int | None = None  # loop iterations (None: not a loop)
    items: list[Any] | None = None
    iterations: dict[int, IterationState] = msgspec.field(default_factory=dict)
    result: Any = None
    result_ref: str | None = None
    error: Any = None

    def iteration(self, key: int) -> IterationState:
        it = self.iterations.get(key)
        if it is None:
            it = self.iterations[key] = IterationState()
        return it


class ExecState(msgspec.Struct, kw_only=True):
    execution_id: str
    tenant: str
    project: str
    affinity: str = ""
    requested: bool = False
    # As requested (None: the execution names no playbook). Anything but {"path", "version"?} fails it.
    playbook_ref: Any = None
    pinned: dict[str, Any] | None = None  # from execution.started: {"path", "version"}
    workload: dict[str, Any] = msgspec.field(default_factory=dict)
    status: str = "PENDING"  # RUNNING, COMPLETED, FAILED, CANCELLED
    cancel_requested: bool = False
    # A child execution's parent as its execution.requested names it: execution_id, tenant, project,
    # affinity, step, iteration, attempt, command_id, depth.
    parent: dict[str, Any] | None = None
    depth: int = 0  # how many parents up to the root (0: started by a client or a schedule)
    children: dict[str, ChildRef] = msgspec.field(default_factory=dict)  # by child execution id
    steps: dict[str, StepRun] = msgspec.field(default_factory=dict)
    last_seq: int = 0
    ahead: set[int] = msgspec.field(default_factory=set)

    @property
    def terminal(self) -> bool:
        return self.status in ("COMPLETED", "FAILED", "CANCELLED")

    def step(self, name: str) -> StepRun:
        run = self.steps.get(name)
        if run is None:
            run = self.steps[name] = StepRun()
        return run


def new_state(env: Envelope) -> ExecState:
    return ExecState(execution_id=env.execution_id, tenant=env.tenant, project=env.project, affinity=env.affinity)


def ts_ms(ts: str) -> int:
    """Epoch milliseconds of an envelope timestamp (0 if it cannot be read)."""
    try:
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    except ValueError:
        return 0


def state_child(payload: dict[str, Any]) -> str | None:
    """The child execution a ``callback.waiting`` waits for (None: an external callback)."""
    child = payload.get("child")
    return child["execution_id"] if isinstance(child, dict) and isinstance(child.get("execution_id"), str) else None


def _key(payload: dict[str, Any]) -> int:
    iteration = payload.get("iteration")
    return iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else NOT_LOOP


def apply(state: ExecState, seq: int, env: Envelope, *, own: bool = False) -> bool:
    """Apply one event; returns False if it was already applied. ``own``: emitted here, applied early."""
    if own:
        pass  # the caller records the sequence in ``ahead`` once the WAL acked the event
    elif seq <= state.last_seq:
        return False
    elif seq in state.ahead:
        state.ahead.discard(seq)
        state.last_seq = seq
        return False
    else:
        state.last_seq = seq
        if state.ahead:
            # Own events the consumer never delivers (it filters them out) are behind us now.
            state.ahead = {s for s in state.ahead if s > seq}
    _apply(state, env)
    return True


def _apply(state: ExecState, env: Envelope) -> None:
    kind, payload = env.type, env.payload
    if kind == "execution.requested":
        state.requested = True
        state.playbook_ref = payload.get("playbook")
        workload = payload.get("workload")
        state.workload = workload if isinstance(workload, dict) else {}
        parent = payload.get("parent")
        if isinstance(parent, dict) and parent.get("tenant") == state.tenant:
            state.parent = parent
            depth = parent.get("depth")
            state.depth = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0 else 1
        return
    if kind == "execution.started":
        pinned = payload.get("playbook")
        state.pinned = pinned if isinstance(pinned, dict) else state.pinned
        if isinstance(payload.get("workload"), dict):
            state.workload = payload["workload"]
        if not state.terminal:
            state.status = "RUNNING"
        return
    if kind == "execution.cancel_requested":
        state.cancel_requested = True
        return
    if kind in ("execution.completed", "execution.failed", "execution.cancelled"):
        if not state.terminal:
            state.status = kind.rpartition(".")[2].upper()
        return
    if env.step is None:
        return
    run = state.step(env.step)
    if kind == "step.enter":
        if run.status == PENDING:
            run.status = ENTERED
            run.entered_from = payload.get("from")
            count = payload.get("iterations")
            run.count = count if isinstance(count, int) else None
            items = payload.get("items")
            run.items = items if isinstance(items, list) else None
        return
    if kind == "step.failed":
        run.status = FAILED
        run.error = payload.get("error")
        return
    key = _key(payload)
    it = run.iteration(key)
    attempt = env.attempt or 0
    it.attempt = max(it.attempt, attempt)
    if kind == "command.issued":
        it.issued = max(it.issued, attempt)
        if it.status in (PENDING, RETRYING, ERROR):
            it.status = ISSUED
            it.claimed = False
            it.inline = False
            it.since_ms = ts_ms(env.ts)
    elif kind == "command.claimed":
        it.claimed = True
        it.inline = payload.get("worker") == INLINE_WORKER
    elif kind == "callback.waiting":
        it.issued = max(it.issued, attempt)
        if (child := state_child(payload)) is not None:
            where = payload["child"]
            state.children[child] = ChildRef(
                command_id=command_id(state.execution_id, env.step, None if key == NOT_LOOP else key, attempt),
                project=where.get("project") if isinstance(where.get("project"), str) else state.project,
                affinity=where.get("affinity") if isinstance(where.get("affinity"), str) else "",
            )
        if it.status in (PENDING, RETRYING, ERROR):
            it.status = WAITING
            it.token = payload.get("callback_id")
            it.child = state_child(payload)
            it.child_status = None
            it.received = False
            it.since_ms = ts_ms(env.ts)
    elif kind == "command.completed" and isinstance(payload.get("timer"), str):
        # A timer the scheduler fired: recorded here, acted on by the planner.
        if payload["timer"] == "callback_timeout":
            it.timed_out = max(it.timed_out, attempt)
        elif payload["timer"] == "retry":
            it.retry_ready = max(it.retry_ready, attempt)
    elif kind in ("step.exit", "command.completed"):
        if (key == NOT_LOOP or kind == "command.completed") and it.status != DONE:
            it.status = DONE
            it.result = payload.get("result")
            it.result_ref = env.result_ref
            it.error = None
        if kind == "step.exit" and run.status in (PENDING, ENTERED):
            # A plain step's result, or a loop's aggregate: the step is done.
            run.status = COMPLETED
            run.result = payload.get("result")
            run.result_ref = env.result_ref
    elif kind == "call.error":
        # An error from an older delivery than the newest one seen does not count, nor one about an
        # older command (a redelivery of command 1 reports attempt 2, as the retry command 2 does).
        issued = command_id(state.execution_id, env.step, None if key == NOT_LOOP else key, it.issued)
        if it.status in (ISSUED, WAITING) and attempt >= it.attempt and payload.get("command_id", issued) == issued:
            it.status = ERROR
            it.error = payload.get("error", payload or None)
    elif kind == "step.retry":
        if it.status in (ERROR, ISSUED, WAITING):
            it.status = RETRYING
            it.since_ms = ts_ms(env.ts)
        it.retry_due = max(it.retry_due, attempt)
    elif kind == "callback.received":
        waiting_for = command_id(state.execution_id, env.step, None if key == NOT_LOOP else key, it.issued)
        child = payload.get("child")
        if isinstance(child, dict):
            # A child execution ended: its orchestrator says so on this (the parent's) WAL.
            if (it.status == WAITING and not it.received and it.child is not None
                    and payload.get("command_id") == waiting_for and child.get("execution_id") == it.child):
                status = child.get("status")
                it.received = True
                it.child_status = status if status in ("COMPLETED", "FAILED", "CANCELLED") else "FAILED"
                it.result = payload.get("result")
                it.result_ref = env.result_ref
                it.error = child.get("error")
            return
        if (
            it.status == WAITING
            and not it.received
            and payload.get("command_id") == waiting_for
            and it.token is not None
            and payload.get("callback_id") == it.token
        ):
            it.received = True
            it.result = payload.get("payload")
