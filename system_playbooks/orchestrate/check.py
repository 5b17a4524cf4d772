"""Would this playbook decide what the record shows? Re-drive the planner over a recorded history.

The orchestrator's decisions are the events it publishes itself (no
``causation_id``; a worker's reports carry their command's id): the execution
start, step entries and failures, commands issued, callback waits, retries,
loop and callback results, the execution's end. Every other event is an
*input*: the request, a worker's report, a fired timer, a callback, a cancel.

:func:`check` folds the history into a fresh :class:`~.state.ExecState` in WAL
order. After each input it asks :func:`~.planner.plan` what is due; each
recorded decision must be one of those (same deterministic event id, type,
step, attempt and payload, random callback tokens aside). The first recorded
decision the playbook would not make, or would make differently, is the
divergence. What it would decide after the last event and the record does
not show yet is reported as ``pending``, not as a divergence (a live
execution's orchestrator may not have acted yet).

A decision planned before an input that changes the plan (a cancel arriving
while the orchestrator publishes) still counts as due: the orchestrator
decided on the state it had.

>>> from locator import new_event
>>> from system_playbooks.orchestrate.playbook import Policy, load_playbook
>>> pb = load_playbook("path: demo/ab\\nversion: 1\\nsteps:\\n  - {name: a, tool: {kind: noop}}", policy=Policy())
>>> ev = lambda t, **kw: new_event(tenant="acme", project="web", execution_id="7", type=t, **kw)
>>> history = [ev("execution.requested", payload={"playbook": {"path": "demo/ab", "version": 1}})]
>>> report = check([WalEvent(1, history[0])], pb)
>>> report.divergence is None, [d.type for d in report.pending]
(True, ['execution.started', 'step.enter', 'command.issued'])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from locator.envelope import Envelope
from projector.fold import WalEvent
from system_playbooks.orchestrate.children import ChildLimits
from system_playbooks.orchestrate.planner import plan
from system_playbooks.orchestrate.playbook import Playbook
from system_playbooks.orchestrate.state import ExecState, apply, new_state, ts_ms

DECISIONS = frozenset(
    {
        "execution.started", "step.enter", "step.failed", "command.issued", "callback.waiting", "step.retry",
        "step.exit", "call.error", "execution.completed", "execution.failed", "execution.cancelled",
    }
)
PASSIVE = frozenset({"command.claimed"})  # recorded, but never a reason for the orchestrator to plan
_VOLATILE = ("callback_id", "callback_path")  # one-time tokens: random by design
_BY_REFERENCE = "(stored by reference)"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One decision as the check compares it (``payload`` without its random or stored parts).

    ``seq``: where the record holds it (None: not recorded); ``due_after``: the input event after which
    the playbook decides it (None for a recorded one).
    """

    event_id: str
    type: str
    step: str | None
    attempt: int | None
    payload: dict[str, Any]
    seq: int | None = None
    due_after: int | None = None


class Divergence(msgspec.Struct, frozen=True, kw_only=True):
    """Where the record and the playbook part.

    ``seq`` is the first diverging event: the input (a worker's report, the request, a timer…) after
    which the playbook decides otherwise than the record shows; ``input`` is that event. ``recorded``
    is the first recorded decision that shows it (at ``recorded.seq``) and ``expected`` what the
    playbook decides instead at that point (empty: nothing).
    """

    seq: int
    reason: str
    input: Decision | None  # None: the record holds a decision before any input
    recorded: Decision
    expected: list[Decision]


class CheckReport(msgspec.Struct, kw_only=True):
    playbook: dict[str, Any]
    events: int = 0
    decisions: int = 0  # recorded decisions that matched before the divergence (or in all)
    divergence: Divergence | None = None
    pending: list[Decision] = msgspec.field(default_factory=list)


def is_decision(env: Envelope) -> bool:
    """Did the orchestrator publish this event? (Workers set ``causation_id`` to their command's id.)

    A ``command.completed`` is a decision when the orchestrator made it (a loop iteration's callback
    result); a fired timer's is an input, as is a worker's.
    """
    if env.causation_id is not None:
        return False
    return env.type in DECISIONS or (env.type == "command.completed" and "timer" not in env.payload)


def _decision(env: Envelope, seq: int | None = None, *, by_reference: bool = False) -> Decision:
    payload = {k: v for k, v in env.payload.items() if k not in _VOLATILE}
    if env.type == "execution.started":
        payload.pop("playbook", None)  # the version pin: another version is what --against-version asks about
    if by_reference or env.result_ref is not None:
        payload.pop("result", None)
        payload.pop("result_bytes", None)
    return Decision(event_id=env.event_id, type=env.type, step=env.step, attempt=env.attempt, payload=payload, seq=seq)


def _copy(state: ExecState) -> ExecState:
    return msgspec.convert(msgspec.to_builtins(state), ExecState)


def decide(state: ExecState, playbook: Playbook, now_ms: int, limits: ChildLimits | None = None) -> list[Envelope]:
    """Every event the orchestrator would publish now, on a copy of ``state`` (which is left as it is).

    A step result too big for an event goes by reference, as the orchestrator stores it: planning
    goes on past it with the result replaced by a reference.
    """
    work = _copy(state)
    decided: list[Envelope] = []
    for _ in range(len(playbook.steps) * 4 + 4):
        more = plan(work, playbook, now_ms=now_ms, new_token=lambda: "check", payload_cap=64 * 1024, limits=limits)
        decided += more.events
        if more.oversized is None:
            break
        env = msgspec.structs.replace(more.oversized, payload=more.oversized.payload | {"result": None},
                                      result_ref=_BY_REFERENCE)
        apply(work, 0, env, own=True)
        decided.append(env)
    return decided


class _Due(NamedTuple):
    env: Envelope
    after: int  # the input's seq


def check(events: Iterable[WalEvent], playbook: Playbook, *, limits: ChildLimits | None = None) -> CheckReport:
    """Compare the recorded decisions of one execution's history (WAL order) with ``playbook``'s.

    ``limits``: the child-execution limits the orchestrator ran with (it reads them from the environment).
    """
    report = CheckReport(playbook={"path": playbook.path, "version": playbook.version})
    name = f"playbook {playbook.path} v{playbook.version}"
    state: ExecState | None = None
    due: dict[str, _Due] = {}  # decided after the last input, not recorded yet
    earlier: dict[str, _Due] = {}  # decided after an earlier input, not recorded yet
    inputs: dict[int, Envelope] = {}
    last_input = 0
    matched: set[str] = set()

    def diverged(seq: int, env: Envelope, expected: list[_Due], reason: str) -> CheckReport:
        after = min((d.after for d in expected), default=last_input)
        cause = inputs.get(after)
        report.divergence = Divergence(
            seq=after or seq, reason=reason, input=_decision(cause, after) if cause is not None else None,
            recorded=_decision(env, seq),
            expected=[msgspec.structs.replace(_decision(d.env, by_reference=env.result_ref is not None),
                                              due_after=d.after) for d in expected],
        )
        return report

    for seq, env in events:
        report.events += 1
        if state is None:
            state = new_state(env)
        elif (env.tenant, env.project) != (state.tenant, state.project):
            continue  # same id, another tenant's execution: not this history (as the orchestrator skips it)
        if is_decision(env):
            if env.event_id in matched:
                apply(state, seq, env)  # a re-publish after the duplicate window: the same decision again
                continue
            want = due.pop(env.event_id, None) or earlier.pop(env.event_id, None)
            if want is None:
                return diverged(seq, env, list(due.values()),
                                f"the record has {env.type} {env.event_id!r}, which {name} does not decide here")
            expected = _decision(want.env, by_reference=env.result_ref is not None)
            if env.type == "execution.completed" and "result" not in env.payload:
                # Recorded before executions had a result: the end itself is what is compared.
                expected = msgspec.structs.replace(expected, payload={
                    k: v for k, v in expected.payload.items() if k != "result"})
            if expected != msgspec.structs.replace(_decision(env, seq), seq=None):
                return diverged(seq, env, [want], f"{name} decides {env.type} {env.event_id!r} differently")
            matched.add(env.event_id)
            report.decisions += 1
            apply(state, seq, env)
            continue
        if apply(state, seq, env) and env.type not in PASSIVE and state.requested and not state.terminal:
            inputs[seq], last_input = env, seq
            earlier.update(due)
            due = {}
            for decided in decide(state, playbook, ts_ms(env.ts), limits):
                before = earlier.pop(decided.event_id, None)  # due since an earlier input already
                due[decided.event_id] = _Due(decided, seq if before is None else before.after)
    report.pending = [msgspec.structs.replace(_decision(d.env), due_after=d.after) for d in due.values()]
    return report
