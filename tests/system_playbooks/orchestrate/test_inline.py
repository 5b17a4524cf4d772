"""Inline steps (system_playbooks/orchestrate/inline.py): which steps, what is published, how a rebuilt state resumes."""

from __future__ import annotations

import msgspec
import pytest

from kernel.errors import ConfigError
from locator import new_event
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope
from projector.fold import WalEvent
from system_playbooks.orchestrate.check import check
from system_playbooks.orchestrate.inline import Inliner, inline_from_env
from system_playbooks.orchestrate.planner import plan, resume
from system_playbooks.orchestrate.playbook import Playbook, Policy, load_playbook
from system_playbooks.orchestrate.state import ExecState, apply, new_state

X = "7"
CHAIN = """\
path: demo/chain
version: 1
steps:
  - {name: a, tool: {kind: noop, result: 1}, next: [{step: b}]}
  - {name: b, tool: {kind: noop, result: "{{ steps.a.result + 1 }}"}, next: [{step: c}]}
  - {name: c, pool: gpu, tool: {kind: noop, result: 3}}
"""


def requested(pb: Playbook) -> Envelope:
    return new_event(tenant="acme", project="web", execution_id=X, type="execution.requested",
                     payload={"playbook": {"path": pb.path, "version": pb.version}, "workload": {}})


def started(pb: Playbook) -> tuple[ExecState, Envelope]:
    env = requested(pb)
    state = new_state(env)
    apply(state, 1, env)
    return state, env


def inliner(**kw: object) -> Inliner:
    opts: dict[str, object] = {"enabled": True, "policy": Policy(), "payload_cap": DEFAULT_PAYLOAD_CAP} | kw
    return Inliner(**opts)  # type: ignore[arg-type]


def test_a_noop_chain_is_planned_in_one_call_with_a_workers_events_and_a_pooled_noop_goes_to_its_pool() -> None:
    pb = load_playbook(CHAIN, policy=Policy())
    state, _ = started(pb)
    run = inliner()
    decided = plan(state, pb, now_ms=0, new_token=lambda: "t", inline=lambda s, c: run.outcome(s, c, claimed=False))
    assert [(e.type, e.step) for e in decided.events] == [
        ("execution.started", None),
        ("step.enter", "a"), ("command.issued", "a"), ("command.claimed", "a"), ("step.exit", "a"),
        ("step.enter", "b"), ("command.issued", "b"), ("command.claimed", "b"), ("step.exit", "b"),
        ("step.enter", "c"), ("command.issued", "c"),
    ]  # fmt: skip
    assert [c.step for c in decided.commands] == ["c"] and decided.commands[0].pool == "gpu"
    claim, exit_b = decided.events[7], decided.events[8]
    assert (claim.event_id, claim.causation_id, claim.attempt) == (f"{X}:b:-:1:claimed:1", f"{X}:b:-:1", 1)
    assert claim.payload == {"command_id": f"{X}:b:-:1", "iteration": None, "delivery": 1, "worker": "inline",
                             "pool": "shared"}
    assert (exit_b.event_id, exit_b.causation_id, exit_b.payload["result"]) == (f"{X}:b:-:result", f"{X}:b:-:1", 2)
    assert state.steps["b"].status == "COMPLETED" and state.steps["c"].status == "ENTERED"


@pytest.mark.parametrize(
    ("why", "kw", "result"),
    [("off", {"enabled": False}, 1), ("noop not allowed", {"policy": Policy(tool_kinds=("python",))}, 1),
     ("over the payload cap", {"payload_cap": 100}, "x" * 200)],
)
def test_a_noop_goes_to_a_worker_when(why: str, kw: dict[str, object], result: object) -> None:
    pb = load_playbook(f"path: demo/one\nversion: 1\nsteps:\n  - {{name: a, tool: {{kind: noop, result: {msgspec.json.encode(result).decode()}}}}}\n",
                       policy=Policy())  # fmt: skip
    state, _ = started(pb)
    run = inliner(**kw)
    decided = plan(state, pb, now_ms=0, new_token=lambda: "t", inline=lambda s, c: run.outcome(s, c, claimed=False))
    assert [c.step for c in decided.commands] == ["a"], why
    assert decided.events[-1].type == "command.issued"


def test_a_rebuilt_state_resumes_an_issued_inline_step_whatever_its_age_but_not_a_workers_claim() -> None:
    pb = load_playbook(CHAIN, policy=Policy())
    state, req = started(pb)
    run = inliner()
    decided = plan(state, pb, now_ms=0, new_token=lambda: "t", inline=lambda s, c: run.outcome(s, c, claimed=False))
    record = [req, *decided.events]
    old = "2020-01-01T00:00:00.000Z"
    window = 120_000
    now = 1_900_000_000_000  # years after ``old``: far past the duplicate window

    def rebuilt(events: list[Envelope]) -> ExecState:
        st = new_state(req)
        for seq, env in enumerate(events, 1):
            apply(st, seq, msgspec.structs.replace(env, ts=old))
        return st

    cut = [e.type for e in record].index("command.claimed")  # a's issue stored, not its claim
    for upto, claimed_by in ((cut, None), (cut + 1, "inline")):
        st = rebuilt(record[:upto])
        assert st.steps["a"].iterations[-1].claimed is (claimed_by is not None)
        assert [c.step for c in resume(st, pb, now_ms=now, window_ms=window, inline=run.step).commands] == ["a"]
        # A worker's step (inline=None: nothing runs inline) is re-sent only within the window, unless claimed inline.
        again = resume(st, pb, now_ms=now, window_ms=window).commands
        assert [c.step for c in again] == ([] if claimed_by is None else ["a"])
    worker_claim = msgspec.structs.replace(record[cut], payload=record[cut].payload | {"worker": "host-1"})
    st = rebuilt([*record[:cut], worker_claim])
    assert resume(st, pb, now_ms=now, window_ms=window, inline=run.step).commands == []


def test_replay_check_reads_inline_claims_and_results_as_inputs() -> None:
    pb = load_playbook(CHAIN, policy=Policy())
    state, req = started(pb)
    run = inliner()
    decided = plan(state, pb, now_ms=0, new_token=lambda: "t", inline=lambda s, c: run.outcome(s, c, claimed=False))
    history = [WalEvent(seq, env) for seq, env in enumerate([req, *decided.events], 1)]
    report = check(history, pb)
    assert report.divergence is None and report.pending == []
    assert report.decisions == 7  # started, then enter + issued of a, b and c: not the claims nor the results


def test_the_setting() -> None:
    assert [inline_from_env({"NOETL_INLINE_STEPS": v}) for v in ("", "1", "ON", "true", "0", "off", "No")] == [
        True, True, True, True, False, False, False]
    with pytest.raises(ConfigError, match="NOETL_INLINE_STEPS must be one of"):
        inline_from_env({"NOETL_INLINE_STEPS": "2"})
