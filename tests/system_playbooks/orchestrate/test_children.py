"""Playbooks that call playbooks, through the orchestrator's pure core: no NATS, several executions.

:class:`World` stands in for the WALs of several executions (one list per
execution, a duplicate window keyed by event id as ``Nats-Msg-Id`` gives),
the plug-in's loop for each (apply, plan, publish ``remote`` events to the
execution they name, then the execution's own) and noop-running workers.
Every execution's projection is checked against a fresh fold of its WAL, and
``check`` (what ``replay --check`` runs) against each playbook.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest

from locator.envelope import Envelope, new_event, now_ts
from locator.ids import child_execution_id, timestamp_ms_of
from projector.fold import WalEvent, fold
from projector.projection import Projection, canonical
from system_playbooks.orchestrate.check import check
from system_playbooks.orchestrate.children import ChildLimits, LimitError
from system_playbooks.orchestrate.errors import PlaybookError
from system_playbooks.orchestrate.planner import plan
from system_playbooks.orchestrate.playbook import Playbook, Policy, load_playbook
from system_playbooks.orchestrate.state import ExecState, apply, new_state, ts_ms

POLICY = Policy(python_allow=("examples.tools.",))
TENANT = "acme"
ROOT = "123456789012345678"

CHILD = """
path: kids/child
version: 1
steps:
  - name: route
    tool: {kind: noop}
    next:
      - {step: compute, when: "workload.mode == 'ok'"}
      - {step: boom, when: "workload.mode == 'fail'"}
      - {step: hold, when: "workload.mode == 'wait'"}
  - {name: compute, tool: {kind: noop, result: "{{ workload.n * 10 }}"}}
  - {name: boom, tool: {kind: python, call: "examples.tools.flaky:always_fail", args: {message: "no {{ workload.n }}"}}}
  - {name: hold, tool: {kind: callback}}
result: "{{ steps.compute.result }}"
"""

PARENT = """
path: kids/parent
version: 1
steps:
  - name: fan
    loop: {over: workload.items}
    tool:
      kind: playbook
      path: kids/child
      project: "{{ item.project }}"
      workload: {n: "{{ item.n }}", mode: "{{ item.mode }}"}
    next: [{step: done}]
    on_error: recover
  - {name: done, tool: {kind: noop, result: "{{ steps.fan.result }}"}}
  - {name: recover, tool: {kind: noop, result: recovered}}
"""


def items(*modes: str) -> list[dict[str, Any]]:
    return [{"n": n, "mode": mode, "project": ("kids-b", "kids-c")[n % 2]} for n, mode in enumerate(modes)]


def linked(p: Projection) -> list[dict[str, Any]]:
    """The projection's ``children`` links (there must be some)."""
    assert isinstance(p.children, list), "the projection has no children links"
    return p.children


class World:
    """Executions under the planner, each with its own WAL; ``inbox`` holds what is published and not yet applied."""

    def __init__(self, playbooks: dict[str, str], *, limits: ChildLimits | None = None) -> None:
        self.playbooks = {path: load_playbook(text, policy=POLICY) for path, text in playbooks.items()}
        self.limits = limits
        self.seq = itertools.count(1)
        self.wals: dict[str, list[WalEvent]] = {}
        self.ids: set[str] = set()
        self.states: dict[str, ExecState] = {}
        self.inbox: list[Envelope] = []
        self.commands: list[Any] = []

    def publish(self, env: Envelope) -> None:
        if env.event_id in self.ids:  # the duplicate window
            return
        self.ids.add(env.event_id)
        self.wals.setdefault(env.execution_id, []).append(WalEvent(next(self.seq), env))
        self.inbox.append(env)

    def start(self, path: str, workload: dict[str, Any], *, project: str = "web", execution_id: str = ROOT) -> str:
        self.publish(new_event(tenant=TENANT, project=project, execution_id=execution_id, type="execution.requested",
                               payload={"playbook": {"path": path, "version": 1}, "workload": workload}))
        return execution_id

    def playbook(self, state: ExecState) -> Playbook:
        return self.playbooks[state.playbook_ref["path"]]

    def step(self) -> bool:
        """Deliver the oldest pending event to its execution and act on the plan; False when idle."""
        if not self.inbox:
            return self.work()
        env = self.inbox.pop(0)
        state = self.states.setdefault(env.execution_id, new_state(env))
        seq = next(s for s, e in self.wals[env.execution_id] if e.event_id == env.event_id)
        if not apply(state, seq, env) or not state.requested or state.terminal:
            return True
        decided = plan(state, self.playbook(state), now_ms=ts_ms(now_ts()), new_token=lambda: "t" * 24,
                       limits=self.limits)
        for remote in decided.remote:  # first, as the plug-in publishes them
            self.publish(remote)
        for own in decided.events:
            if own.event_id not in self.ids:
                self.ids.add(own.event_id)
                s = next(self.seq)
                self.wals[own.execution_id].append(WalEvent(s, own))
                state.ahead.add(s)
                assert not apply(state, s, own)
        self.commands += decided.commands
        return True

    def work(self) -> bool:
        """A data worker runs one queued command (noop: its result; python: the example always fails)."""
        if not self.commands:
            return False
        c = self.commands.pop(0)
        common = {"tenant": c.tenant, "project": c.project, "affinity": c.affinity, "execution_id": c.execution_id,
                  "step": c.step, "attempt": c.attempt, "causation_id": c.command_id}
        if c.tool["kind"] == "noop":
            kind = "step.exit" if c.iteration is None else "command.completed"
            payload = {"result": c.tool.get("result"), "iteration": c.iteration, "command_id": c.command_id}
        else:
            kind, payload = "call.error", {"error": {"type": "ToolFailed", "message": c.tool["args"]["message"]},
                                           "iteration": c.iteration, "command_id": c.command_id}
        self.publish(new_event(type=kind, payload=payload, event_id=f"{c.command_id}:{kind}", **common))
        return True

    def settle(self) -> None:
        for _ in range(10_000):
            if not self.step():
                return
        raise AssertionError("the executions do not settle")

    def projection(self, execution_id: str) -> Projection:
        """The fold of the execution's WAL, equal to folding it one event at a time, each delivered twice."""
        wal = self.wals[execution_id]
        p = fold(None, wal)
        again = None
        for e in wal:
            again = fold(again, [e, e])
        assert p is not None and again is not None and canonical(again) == canonical(p)
        return p

    def children_of(self, execution_id: str) -> list[str]:
        return [i for i, wal in self.wals.items()
                if (wal[0].env.payload.get("parent") or {}).get("execution_id") == execution_id]

    def types(self, execution_id: str) -> list[tuple[str, str | None]]:
        return [(e.env.type, e.env.step) for e in self.wals[execution_id]]

    def check_all(self) -> None:
        """What ``replay --check`` says of every execution: the record is what its playbook decides."""
        for execution_id, wal in self.wals.items():
            report = check(wal, self.playbook(self.states[execution_id]), limits=self.limits)
            assert report.divergence is None, (execution_id, report.divergence)


def world() -> World:
    return World({"kids/parent": PARENT, "kids/child": CHILD})


def test_a_loop_of_five_children_gathers_their_results_in_item_order() -> None:
    w = world()
    parent = w.start("kids/parent", {"items": items("ok", "ok", "ok", "ok", "ok")})
    w.settle()
    kids = w.children_of(parent)
    assert len(kids) == 5 and len(set(kids)) == 5
    p = w.projection(parent)
    assert p.status == "COMPLETED"
    assert p.steps["fan"].result == [0, 10, 20, 30, 40]
    assert p.result == [0, 10, 20, 30, 40] and p.result_ref is msgspec.UNSET  # the last step's, done's
    assert p.parent is msgspec.UNSET
    assert [(c["iteration"], c["project"], c["status"]) for c in linked(p)] == [
        (n, ("kids-b", "kids-c")[n % 2], "COMPLETED") for n in range(5)
    ]
    for n, kid in enumerate(kids):
        child = w.projection(kid)
        assert (child.status, child.project, child.result) == ("COMPLETED", ("kids-b", "kids-c")[n % 2], n * 10)
        assert child.parent == {"execution_id": parent, "project": "web", "affinity": "", "step": "fan", "iteration": n}
        assert child.children is msgspec.UNSET
        assert kid == child_execution_id(parent, "fan", n, 1)
        assert timestamp_ms_of(int(kid)) == timestamp_ms_of(int(parent))
    w.check_all()


def test_a_failing_child_routes_the_parents_step_to_on_error() -> None:
    w = world()
    parent = w.start("kids/parent", {"items": items("ok", "fail", "ok")})
    w.settle()
    p = w.projection(parent)
    assert p.status == "COMPLETED"
    assert p.steps["fan"].status == "FAILED"
    error = p.steps["fan"].error
    assert error["iteration"] == 1 and error["error"]["type"] == "child_failed"
    assert error["error"]["error"]["error"]["message"] == "no 1"  # the child's own error, inside
    assert (p.steps["recover"].status, "done" in p.steps, p.result) == ("COMPLETED", False, "recovered")
    failed = w.children_of(parent)[1]
    assert w.projection(failed).status == "FAILED"
    w.check_all()


def test_cancelling_the_parent_cancels_its_waiting_children() -> None:
    w = world()
    parent = w.start("kids/parent", {"items": items("wait", "wait", "ok")})
    w.settle()
    kids = w.children_of(parent)
    assert [w.projection(k).status for k in kids] == ["WAITING", "WAITING", "COMPLETED"]
    w.publish(new_event(tenant=TENANT, project="web", execution_id=parent, type="execution.cancel_requested",
                        event_id=f"{parent}:cancel", payload={"by": "edge"}))
    w.settle()
    assert w.projection(parent).status == "CANCELLED"
    assert [w.projection(k).status for k in kids] == ["CANCELLED", "CANCELLED", "COMPLETED"]
    cancels = [e.env for k in kids for e in w.wals[k] if e.env.type == "execution.cancel_requested"]
    assert [(c.event_id, c.payload) for c in cancels] == [
        (f"{k}:cancel", {"by": "parent", "parent": parent}) for k in kids[:2]
    ]
    # The children's ends still reach the parent's record and links, after it ended.
    assert [c["status"] for c in linked(w.projection(parent))] == ["CANCELLED", "CANCELLED", "COMPLETED"]
    w.check_all()


def test_a_state_rebuilt_from_the_wal_starts_no_second_child() -> None:
    w = world()
    parent = w.start("kids/parent", {"items": items("wait", "wait")})
    w.settle()
    rebuilt = new_state(w.wals[parent][0].env)
    for seq, env in w.wals[parent]:
        apply(rebuilt, seq, env)
    again = plan(rebuilt, w.playbooks["kids/parent"], now_ms=ts_ms(now_ts()), new_token=lambda: "x" * 24)
    assert not again
    # A re-plan of the state before the waits were recorded names the same children, with the same ids.
    before = new_state(w.wals[parent][0].env)
    for seq, env in w.wals[parent]:
        if env.type == "callback.waiting":
            break
        apply(before, seq, env)
    replanned = plan(before, w.playbooks["kids/parent"], now_ms=ts_ms(now_ts()), new_token=lambda: "x" * 24)
    recorded = [e for k in w.children_of(parent) for _, e in w.wals[k][:1]]
    assert [(e.execution_id, e.event_id) for e in replanned.remote] == [(e.execution_id, e.event_id) for e in recorded]


def test_depth_and_fanout_limits_fail_the_step_with_a_clear_error() -> None:
    w = World({"kids/parent": PARENT, "kids/child": CHILD}, limits=ChildLimits(fanout=2))
    parent = w.start("kids/parent", {"items": items("ok", "ok", "ok")})
    w.settle()
    p = w.projection(parent)
    assert not w.children_of(parent)
    assert p.steps["fan"].error["type"] == "limit"
    assert "at most 2 children (NOETL_CHILD_MAX_FANOUT)" in p.steps["fan"].error["message"]
    assert p.steps["recover"].status == "COMPLETED"

    deep = """
path: kids/deep
version: 1
steps:
  - {name: down, tool: {kind: playbook, path: kids/deep}}
"""
    w = World({"kids/deep": deep}, limits=ChildLimits(depth=3))
    root = w.start("kids/deep", {})
    w.settle()
    chain = [root]
    while kids := w.children_of(chain[-1]):
        chain += kids
    assert len(chain) == 4  # the root and three levels of children
    last = w.projection(chain[-1])
    assert last.status == "FAILED"
    assert "at depth 4, over the limit of 3 (NOETL_CHILD_MAX_DEPTH)" in last.error["error"]["message"]
    assert [w.projection(e).status for e in chain] == ["FAILED"] * 4  # each parent fails with its child
    w.check_all()


def test_limits_from_the_environment() -> None:
    assert ChildLimits.from_env({}) == ChildLimits(depth=8, fanout=100)
    assert ChildLimits.from_env({"NOETL_CHILD_MAX_FANOUT": "7"}).fanout == 7
    with pytest.raises(LimitError, match="NOETL_CHILD_MAX_DEPTH must be a positive integer, got '0'"):
        ChildLimits.from_env({"NOETL_CHILD_MAX_DEPTH": "0"})
    with pytest.raises(LimitError, match="NOETL_CHILD_MAX_FANOUT must be a positive integer, got 'many'"):
        ChildLimits.from_env({"NOETL_CHILD_MAX_FANOUT": "many"})


def test_a_result_template_and_the_default_result() -> None:
    w = world()
    kid = w.start("kids/child", {"n": 4, "mode": "ok"}, project="kids-b")
    w.settle()
    assert w.projection(kid).result == 40
    plain = """
path: kids/plain
version: 1
steps:
  - {name: b, tool: {kind: noop, result: second}}
  - {name: a, tool: {kind: noop, result: first}, next: [{step: b}]}
"""
    with pytest.raises(PlaybookError, match="unreachable"):
        load_playbook(plain, policy=POLICY)
    w = World({"kids/plain": plain.replace("- {name: b", "- {name: z, tool: {kind: noop}, next: [{step: a}]}\n  - {name: b")})
    done = w.start("kids/plain", {})
    w.settle()
    assert w.projection(done).result == "second"  # the last in the graph's order, not in the list


@pytest.mark.parametrize(("source", "message"), [
    ("{name: a, tool: {kind: playbook, path: kids/x}, timeout: 5}",
     "steps[0].timeout: a playbook step waits for its child to end: it takes no timeout"),
    ("{name: a, tool: {kind: playbook, path: Kids}}", "steps[0].tool.path: expected `str` matching regex"),
    ("{name: a, tool: {kind: playbook, path: kids/x, version: 0}}", "steps[0].tool.version: expected `int` >= 1"),
    ("{name: a, tool: {kind: playbook, path: kids/x, project: Web}}", "steps[0].tool.project: invalid project 'Web'"),
    ("{name: a, tool: {kind: playbook, path: kids/x, affinity: 'a.b'}}", "steps[0].tool.affinity: invalid affinity"),
    ("{name: a, tool: {kind: playbook, path: kids/x, workload: {v: '{{ nope }}'}}}",
     "steps[0].tool.workload.v: unknown name 'nope'"),
    ("{name: a, tool: {kind: playbook, path: kids/x, project: '{{ steps.zz.result }}'}}",
     "steps[0].tool.project: unknown step 'zz'"),
    ("{name: a, tool: {kind: playbook, path: kids/x, shard: 1}}", "steps[0].tool: object contains unknown field `shard`"),
])
def test_a_bad_playbook_step_is_refused_at_register_time_with_its_path(source: str, message: str) -> None:
    with pytest.raises(PlaybookError) as info:
        load_playbook(f"path: kids/p\nversion: 1\nsteps:\n  - {source}\n", policy=POLICY)
    assert str(info.value).startswith(message), str(info.value)


def test_a_bad_result_template_is_refused_with_its_path() -> None:
    with pytest.raises(PlaybookError, match=r"^result: unknown step 'nope'"):
        load_playbook("path: kids/p\nversion: 1\nsteps: [{name: a, tool: {kind: noop}}]\n"
                      "result: '{{ steps.nope.result }}'\n", policy=POLICY)


def test_a_rendered_project_that_is_no_name_fails_the_step() -> None:
    w = world()
    bad = [{"n": 0, "mode": "ok", "project": "Not A Name"}]
    parent = w.start("kids/parent", {"items": bad})
    w.settle()
    p = w.projection(parent)
    assert not w.children_of(parent)
    assert p.steps["fan"].error["type"] == "template"
    assert "tool.project: invalid project 'Not A Name'" in p.steps["fan"].error["message"]


def test_the_orchestrator_refuses_to_load_with_a_bad_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.host import PluginError
    from system_playbooks.orchestrate.plugin import OrchestratePlugin

    monkeypatch.setenv("NOETL_CHILD_MAX_DEPTH", "-1")
    with pytest.raises(PluginError, match="system/orchestrate: NOETL_CHILD_MAX_DEPTH must be a positive integer"):
        OrchestratePlugin()
    monkeypatch.setenv("NOETL_CHILD_MAX_DEPTH", "2")
    assert OrchestratePlugin()._limits == ChildLimits(depth=2)
