"""The orchestrator's pure core (state fold + planner) driven through whole executions, no NATS.

:class:`Sim` stands in for everything around the planner: a WAL (a list, a
sequence counter and a duplicate window keyed by event id, as ``Nats-Msg-Id``
gives), the plug-in's loop (apply, plan, publish the planned events, record
their sequences in ``state.ahead`` and deliver them back as WAL events), fake
data workers that follow the conventions of :class:`locator.command.Command`,
and the scheduler, which fires a planned timer when a test asks. Every run is
checked against the public projection (:func:`projector.fold.fold`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from locator.command import Command, parse_callback_token
from locator.envelope import Envelope, new_event, now_ts
from projector.fold import WalEvent, fold
from projector.projection import Projection
from system_playbooks.orchestrate.planner import Plan, PlannedTimer, fail_unstartable, plan, resume
from system_playbooks.orchestrate.playbook import Playbook, Policy, load_playbook
from system_playbooks.orchestrate.state import COMPLETED, FAILED, ExecState, apply, new_state, ts_ms

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "playbooks"
POLICY = Policy(python_allow=("examples.tools.",))
EXEC = "7"
WINDOW_MS = 120_000
Tool = Callable[[Command, int], Any]


class ToolFailed(Exception):
    pass


def fake_tool(command: Command, attempt: int) -> Any:
    """What the example tools would return (``attempt`` is the event attempt, as the worker passes it)."""
    tool = command.tool
    if tool["kind"] == "noop":
        return tool.get("result")
    call, args = tool["call"], tool["args"]
    if call.endswith(":multiply"):
        return args["a"] * args["b"]
    if call.endswith(":fail_until") and attempt >= args["attempt_needed"]:
        return attempt
    raise ToolFailed(f"{call} failed on attempt {attempt}")


def failing(message: str) -> Tool:
    def tool(command: Command, attempt: int) -> Any:
        raise ToolFailed(message)

    return tool


def playbook(source: str) -> Playbook:
    """An example by name, or inline YAML."""
    return load_playbook(source if "\n" in source else EXAMPLES / f"{source}.yaml", policy=POLICY)


def event(type: str, payload: dict[str, Any] | None = None, *, step: str | None = None,
          attempt: int | None = None, event_id: str | None = None) -> Envelope:
    return new_event(tenant="acme", project="web", execution_id=EXEC, type=type, step=step, attempt=attempt,
                     payload=payload, event_id=event_id)


def rebuild(wal: list[WalEvent]) -> ExecState:
    """The state a fresh kernel folds from the execution's WAL (as after a crash)."""
    state = new_state(wal[0].env)
    for seq, env in wal:
        apply(state, seq, env)
    return state


class Sim:
    """One execution under the planner; ``wal`` is every stored event, ``commands`` every issued command."""

    def __init__(self, pb: Playbook | str, workload: dict[str, Any] | None = None, *, tool: Tool = fake_tool) -> None:
        self.pb = pb if isinstance(pb, Playbook) else playbook(pb)
        self.tool = tool
        self.seq = itertools.count(1)
        self.wal: list[WalEvent] = []
        self.ids: set[str] = set()
        self.clock = ts_ms(now_ts())
        self.queue: list[Command] = []
        self.commands: list[Command] = []
        self.timers: list[PlannedTimer] = []
        self.tokens: Iterator[str] = (f"secret-{n:016d}" for n in itertools.count())
        self.quiet: dict[int, tuple[bytes, list[str]]] = {}  # WAL length after a round -> (state, its commands)
        request = event("execution.requested", {"playbook": {"path": self.pb.path}, "workload": workload or {}})
        self.state = new_state(request)
        self.deliver(request)

    def store(self, env: Envelope) -> int | None:
        """Append to the WAL; None for a repeated event id (inside the duplicate window)."""
        if env.event_id in self.ids:
            return None
        self.ids.add(env.event_id)
        seq = next(self.seq)
        self.wal.append(WalEvent(seq, env))
        return seq

    def deliver(self, env: Envelope) -> Plan:
        """Publish an event from outside the orchestrator (worker, edge, scheduler); the pump applies it, then plans."""
        seq = self.store(env)
        if seq is not None:
            assert apply(self.state, seq, env)
        return self.plan()

    def plan(self) -> Plan:
        decided = plan(self.state, self.pb, now_ms=self.clock, new_token=lambda: next(self.tokens))
        stored = []
        for env in decided.events:
            seq = self.store(env)
            assert seq is not None, f"the planner emitted {env.event_id} twice"
            self.state.ahead.add(seq)
            stored.append((seq, env))
        for seq, env in stored:  # the pump delivers them back: already applied, skipped
            assert not apply(self.state, seq, env)
        assert not self.state.ahead
        assert not plan(self.state, self.pb, now_ms=self.clock, new_token=lambda: next(self.tokens))
        issued = {c.command_id for c in self.commands}
        assert all(c.command_id not in issued for c in decided.commands)
        self.commands += decided.commands
        self.queue += decided.commands
        self.timers += decided.timers
        round_ = (msgspec.json.encode(self.state), [c.command_id for c in decided.commands])
        self.quiet.setdefault(len(self.wal), round_)
        return decided

    def claim(self, command: Command, delivery: int = 1) -> Plan:
        if command in self.queue:
            self.queue.remove(command)  # with a worker now
        return self.deliver(event(
            "command.claimed", {"command_id": command.command_id, "iteration": command.iteration, "delivery": delivery},
            step=command.step, attempt=command.attempt + delivery - 1,
            event_id=f"{command.command_id}:claimed:{delivery}",
        ))

    def report(self, command: Command, delivery: int = 1, *, tool: Tool | None = None, fresh_id: bool = False) -> Plan:
        """The worker's outcome event; ``fresh_id``: as if published after the duplicate window passed."""
        attempt = command.attempt + delivery - 1
        iteration = command.iteration
        try:
            result = (tool or self.tool)(command, attempt)
        except ToolFailed as e:
            kind, event_id = "call.error", f"{command.command_id}:error:{delivery}"
            payload: dict[str, Any] = {"error": {"type": "ToolFailed", "message": str(e)}}
        else:
            kind = "step.exit" if iteration is None else "command.completed"
            event_id = f"{EXEC}:{command.step}:{'-' if iteration is None else iteration}:result"
            payload = {"result": result}
        payload |= {"iteration": iteration, "command_id": command.command_id}
        return self.deliver(event(kind, payload, step=command.step, attempt=attempt,
                                  event_id=f"{event_id}:late" if fresh_id else event_id))

    def work(self, command: Command | None = None, delivery: int = 1) -> Plan:
        command = command or self.queue[0]
        self.claim(command, delivery)
        return self.report(command, delivery)

    def fire(self, kind: str) -> Plan:
        timer = next(t for t in self.timers if t.event.payload["timer"] == kind)
        self.timers.remove(timer)
        self.clock = max(self.clock, timer.due_ms)
        return self.deliver(timer.event)

    def drive(self, *, fire: tuple[str, ...] = ("retry",)) -> ExecState:
        """Run queued commands and fire due timers of the ``fire`` kinds until nothing moves."""
        for _ in range(500):
            due = [t.event.payload["timer"] for t in self.timers if t.event.payload["timer"] in fire]
            if self.queue:
                self.work()
            elif due:
                self.fire(due[0])
            else:
                return self.state
        raise AssertionError("the execution does not settle")

    def types(self) -> list[tuple[str, str | None]]:
        return [(env.type, env.step) for _, env in self.wal]

    def check(self, status: str, shown: str | None = None) -> Projection:
        """The orchestrator is in ``status`` and the projection of the same WAL agrees (it shows ``shown``)."""
        state = self.state
        assert state.status == status
        p = fold(None, self.wal)
        assert p is not None
        redelivered = None
        for e in self.wal:  # at-least-once delivery: each event twice, folded one at a time
            redelivered = fold(redelivered, [e, e])
        assert redelivered == p
        assert (p.status, p.last_seq, p.event_count) == (shown or status, self.wal[-1].seq, len(self.wal))
        assert set(p.steps) == set(state.steps)
        for name, run in state.steps.items():
            step = p.steps[name]
            assert step.attempts == max((it.attempt for it in run.iterations.values()), default=0), name
            finished = {COMPLETED: {"COMPLETED"}, FAILED: {"FAILED"}}
            assert step.status in finished.get(run.status, {"RUNNING", "WAITING", "ERROR", "RETRYING"}), name
            assert step.result == run.result, name
            if run.status == FAILED:
                assert step.error == run.error, name
        return p

    def results(self) -> dict[str, Any]:
        return {name: run.result for name, run in self.state.steps.items() if run.status == COMPLETED}


# -- every example to its end ------------------------------------------------


def straight(name: str, expected: dict[str, Any], workload: dict[str, Any] | None = None) -> Callable[[], Sim]:
    def run() -> Sim:
        sim = Sim(name, workload)
        sim.drive()
        assert sim.results() == expected
        return sim

    return run


def run_parallel() -> Sim:
    sim = Sim("parallel")
    after_split = sim.work()
    assert [c.step for c in after_split.commands] == ["left", "right"]  # both branches at once
    sim.work(sim.queue[1])
    assert "merge" not in sim.state.steps  # the join waits for its other branch
    sim.drive()
    assert sim.results() == {"split": None, "left": "L", "right": "R", "merge": ["L", "R"]}
    return sim


def run_loop() -> Sim:
    sim = Sim("loop")
    assert [(c.iteration, c.tool["args"]) for c in sim.queue] == [
        (i, {"a": n, "b": n, "label": f"item-{i}"}) for i, n in enumerate([1, 2, 3, 4, 5])
    ]
    sim.queue.reverse()  # finishing last-first: the aggregate is still in item order
    sim.drive()
    assert sim.results() == {"square": [1, 4, 9, 16, 25], "total": "5 squares"}
    return sim


def run_retry() -> Sim:
    sim = Sim("retry")
    for attempt in (1, 2):
        decided = sim.work()
        assert [e.type for e in decided.events] == ["step.retry"] and not decided.commands  # held by the backoff
        assert [t.due_ms for t in decided.timers] == [sim.clock + 100]
        assert sim.fire("retry").commands[0].attempt == attempt + 1
    sim.drive()
    assert sim.results() == {"flaky": 3, "after": None}
    assert [c.command_id for c in sim.commands][:3] == [f"{EXEC}:flaky:-:{a}" for a in (1, 2, 3)]
    return sim


def run_on_error() -> Sim:
    sim = Sim("on_error")
    sim.drive()
    risky = sim.state.steps["risky"]
    assert (risky.status, risky.error["message"]) == (FAILED, "examples.tools.flaky:always_fail failed on attempt 2")
    assert sim.results() == {"recover": "recovered", "finish": None}
    return sim


def waiting_callback() -> tuple[Sim, Envelope]:
    sim = Sim("callback")
    sim.drive()
    waiting = next(env for _, env in sim.wal if env.type == "callback.waiting")
    token = waiting.payload["callback_id"]
    assert waiting.payload == {"command_id": f"{EXEC}:approval:-:1", "iteration": None, "callback_id": token,
                               "callback_path": f"/api/v1/callbacks/{token}", "timeout_s": 60.0}
    assert parse_callback_token(token).command_id == f"{EXEC}:approval:-:1"
    assert not sim.queue and [t.due_ms for t in sim.timers] == [sim.clock + 60_000]  # no worker held
    assert sim.check("RUNNING", "WAITING")
    return sim, waiting


def received(waiting: Envelope, payload: Any, **change: Any) -> Envelope:
    body = {k: waiting.payload[k] for k in ("command_id", "iteration", "callback_id")} | change
    return event("callback.received", body | {"payload": payload}, step=waiting.step, attempt=waiting.attempt)


def run_callback() -> Sim:
    sim, waiting = waiting_callback()
    sim.deliver(received(waiting, {"approved": True}))
    sim.drive()
    assert sim.results() == {"request": {"ask": "ops"}, "approval": {"approved": True}, "approved": None}
    return sim


def run_callback_timeout() -> Sim:
    sim, _ = waiting_callback()
    sim.fire("callback_timeout")
    sim.drive()
    approval = sim.state.steps["approval"]
    assert (approval.status, approval.error) == (FAILED, {"type": "timeout", "message": "no callback within 60s"})
    assert sim.results() == {"request": {"ask": "ops"}, "timed_out": "no answer"}
    return sim


SCENARIOS: dict[str, Callable[[], Sim]] = {
    "linear": straight("linear", {"first": "first", "second": "first then second", "third": None}),
    "when_false": straight("when", {"check": {"greeting": "hello Ada"}, "done": None}),
    "when_true": straight("when", {"check": {"greeting": "hello Ada"}, "notify": "hello Ada", "done": None},
                          {"notify": True}),
    "parallel": run_parallel,
    "loop": run_loop, "retry": run_retry, "on_error": run_on_error, "callback": run_callback,
    "callback_timeout": run_callback_timeout,
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_example_completes(name: str) -> None:
    sim = SCENARIOS[name]()
    assert sim.types()[:2] == [("execution.requested", None), ("execution.started", None)]
    assert sim.types()[-1] == ("execution.completed", None)
    sim.check("COMPLETED")


# -- failure -----------------------------------------------------------------


def test_failure_after_retries_fails_the_execution_with_the_error() -> None:
    sim = Sim("retry", {"succeed_on": 99})
    sim.drive()
    error = {"type": "ToolFailed", "message": "examples.tools.flaky:fail_until failed on attempt 3"}
    assert sim.wal[-1].env.payload == {"error": {"step": "flaky", "error": error}}
    assert "after" not in sim.state.steps and len(sim.commands) == 3
    p = sim.check("FAILED")
    assert (p.error, p.steps["flaky"].attempts, p.steps["flaky"].error) == ({"step": "flaky", "error": error}, 3, error)


def failed_loop() -> Sim:
    def tool(command: Command, attempt: int) -> Any:
        if command.tool["kind"] == "python" and command.tool["args"]["a"] == 3:
            raise ToolFailed("three")
        return fake_tool(command, attempt)

    sim = Sim("loop", tool=tool)
    sim.drive()  # iterations 3 and 4 still report after the failure: nothing changes
    error = {"iteration": 2, "error": {"type": "ToolFailed", "message": "three"}}
    assert sim.state.steps["square"].error == error
    failed = [env.payload for _, env in sim.wal if env.type == "execution.failed"]
    assert failed == [{"error": {"step": "square", "error": error}}]
    assert "total" not in sim.state.steps and sim.state.status == "FAILED"
    return sim


def test_a_failed_loop_iteration_fails_the_step() -> None:
    p = fold(None, failed_loop().wal)
    assert p is not None and p.status == "FAILED"


# -- determinism: nothing twice ------------------------------------------------


def test_planning_again_on_the_same_state_yields_nothing() -> None:
    sim = Sim("parallel")  # (Sim.plan also checks this after every round of every run here)
    sim.work()
    before = msgspec.json.encode(sim.state)
    assert not any(plan(sim.state, sim.pb, now_ms=sim.clock, new_token=lambda: "t" * 24) for _ in range(3))
    assert msgspec.json.encode(sim.state) == before


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_state_rebuilt_from_the_wal_plans_nothing_new(name: str) -> None:
    sim = SCENARIOS[name]()
    issued = {c.command_id for c in sim.commands}
    for n in range(1, len(sim.wal) + 1):  # a kernel crash after the n-th event was stored
        state = rebuild(sim.wal[:n])
        resent = resume(state, sim.pb, now_ms=sim.clock, window_ms=WINDOW_MS)  # as the plug-in does
        again = plan(state, sim.pb, now_ms=sim.clock, new_token=lambda: "r" * 24)
        sent = {c.command_id for c in resent.commands + again.commands}
        assert sent <= issued
        if n in sim.quiet:  # between rounds: the same state, nothing new
            assert msgspec.json.encode(state) == sim.quiet[n][0]
            assert not again
        else:  # in the middle of a round: the rest of that round (in any order), under the same ids
            end = min(q for q in sim.quiet if q > n)
            assert sorted(e.event_id for e in again.events) == sorted(env.event_id for _, env in sim.wal[n:end])
            assert set(sim.quiet[end][1]) <= sent


@pytest.mark.parametrize("name", SCENARIOS)
def test_event_and_command_ids_are_unique_and_deterministic(name: str) -> None:
    first, second = SCENARIOS[name](), SCENARIOS[name]()
    assert len({c.command_id for c in first.commands}) == len(first.commands)
    ids = [[env.event_id for _, env in sim.wal if env.event_id.startswith(f"{EXEC}:")] for sim in (first, second)]
    assert len(set(ids[0])) == len(ids[0]) and ids[0] == ids[1]
    assert [c.command_id for c in first.commands] == [c.command_id for c in second.commands]


def test_resume_resends_exactly_the_unclaimed_young_commands() -> None:
    sim = Sim("loop")
    sim.work(sim.queue[0])
    sim.claim(sim.queue[0])
    state = rebuild(sim.wal)
    resent = resume(state, sim.pb, now_ms=sim.clock, window_ms=WINDOW_MS)
    by_id = {c.command_id: c for c in sim.commands}
    assert [c.command_id for c in resent.commands] == [f"{EXEC}:square:{i}:1" for i in (2, 3, 4)]
    for c in resent.commands:
        assert (c.tool, c.attempt, c.iteration) == (by_id[c.command_id].tool, 1, by_id[c.command_id].iteration)
    assert not resent.events and not resent.timers
    assert not resume(state, sim.pb, now_ms=ts_ms(now_ts()) + WINDOW_MS + 1, window_ms=WINDOW_MS)  # too old
    assert not plan(state, sim.pb, now_ms=sim.clock, new_token=lambda: "r" * 24)


def test_resume_sets_the_timers_of_waiting_callbacks_and_pending_retries_again() -> None:
    sim, waiting = waiting_callback()
    timers = resume(rebuild(sim.wal), sim.pb, now_ms=sim.clock, window_ms=WINDOW_MS).timers
    assert [t.event.event_id for t in timers] == [t.event.event_id for t in sim.timers]
    assert [t.event.event_id for t in timers] == [f"{EXEC}:approval:-:1:timeout"]
    assert timers[0].due_ms == ts_ms(waiting.ts) + 60_000

    sim = Sim("retry")
    sim.work()
    resent = resume(rebuild(sim.wal), sim.pb, now_ms=sim.clock, window_ms=WINDOW_MS)
    assert not resent.commands  # the failed attempt is not re-sent; the retry waits for its backoff
    assert [t.event.event_id for t in resent.timers] == [t.event.event_id for t in sim.timers]
    sim.timers += resent.timers
    assert sim.fire("retry").commands[0].attempt == 2
    assert not sim.fire("retry")  # the timer fired twice: a duplicate, dropped
    sim.drive()
    assert [c.attempt for c in sim.commands if c.step == "flaky"] == [1, 2, 3]


# -- late and duplicate reports ------------------------------------------------


def late_result() -> Sim:
    sim = Sim("linear")
    first = sim.queue[0]
    sim.work()
    assert not sim.report(first, delivery=2)  # a second delivery's success: the same event id, dropped
    assert not sim.report(first, 2, tool=lambda c, a: "late", fresh_id=True)  # past the window: stored, ignored
    sim.drive()
    assert sim.results()["first"] == "first" and sim.results()["second"] == "first then second"
    assert [c.step for c in sim.commands] == ["first", "second", "third"] and sim.state.status == "COMPLETED"
    return sim


def old_error() -> Sim:
    sim = Sim("linear")
    first = sim.queue[0]
    sim.claim(first, 1)
    sim.claim(first, 2)  # the first worker went quiet; the command was redelivered
    assert not sim.report(first, 1, tool=failing("old"))  # delivery 1 errs while delivery 2 runs
    assert [c.step for c in sim.report(first, 2).commands] == ["second"]
    assert not sim.report(first, 1, tool=failing("older"), fresh_id=True)  # ... and again after the step completed
    sim.drive()
    first_run = sim.state.steps["first"]
    assert (first_run.status, first_run.result, first_run.error) == (COMPLETED, "first", None)
    assert sim.state.status == "COMPLETED"
    return sim


def second_callback() -> Sim:
    sim, waiting = waiting_callback()
    assert not sim.deliver(received(waiting, {"approved": True}, callback_id=waiting.payload["callback_id"] + "x"))
    assert not sim.deliver(received(waiting, {"approved": True}, command_id=f"{EXEC}:approval:-:2"))
    assert sim.state.steps["approval"].iterations[-1].received is False
    sim.deliver(received(waiting, {"approved": False}))
    assert not sim.deliver(received(waiting, {"approved": True}))  # the token was used
    sim.drive()
    assert sim.results()["approval"] == {"approved": False} and "approved" not in sim.state.steps
    assert not sim.fire("callback_timeout")  # the timer still fires: nothing happens
    assert sim.state.status == "COMPLETED"
    return sim


LATE = [late_result, old_error, second_callback]


@pytest.mark.parametrize("scenario", LATE, ids=lambda f: f.__name__)
def test_a_late_duplicate_or_wrong_report_changes_nothing(scenario: Callable[[], Sim]) -> None:
    scenario()


# A step's end is sticky in the fold, as the orchestrator's view is: late reports change neither.
@pytest.mark.parametrize("scenario", [failed_loop, *LATE], ids=lambda f: f.__name__)
def test_the_projection_agrees_after_late_reports(scenario: Callable[[], Sim]) -> None:
    sim = scenario()
    sim.check(sim.state.status)


def test_an_error_from_an_older_command_does_not_fail_the_retry_in_flight() -> None:
    sim = Sim("retry")
    first = sim.queue[0]
    sim.work()  # attempt 1 fails; its worker dies before the ack, so the command comes back
    sim.claim(first, delivery=2)
    second = sim.fire("retry").commands[0]
    sim.claim(second)
    assert not sim.report(first, delivery=2)  # command 1's redelivery fails too: not about command 2
    assert sim.state.steps["flaky"].iterations[-1].status == "ISSUED"
    sim.report(second, tool=lambda c, a: "second")
    sim.drive()
    assert sim.results()["flaky"] == "second" and [c.attempt for c in sim.commands if c.step == "flaky"] == [1, 2]
    sim.check("COMPLETED")


# -- cancellation ----------------------------------------------------------------


def test_cancel_issues_nothing_new_and_waits_for_in_flight_commands() -> None:
    sim = Sim("parallel")
    sim.work()
    left, right = sim.queue
    assert not sim.deliver(event("execution.cancel_requested", {"reason": "test"}))
    assert not sim.work(left).commands and sim.state.status == "RUNNING"  # right is still in flight
    assert [e.type for e in sim.work(right).events] == ["execution.cancelled"]
    assert "merge" not in sim.state.steps and [c.step for c in sim.commands] == ["split", "left", "right"]
    sim.check("CANCELLED")


def test_cancel_while_a_callback_waits_cancels_at_once() -> None:
    sim, _ = waiting_callback()
    assert [e.type for e in sim.deliver(event("execution.cancel_requested")).events] == ["execution.cancelled"]
    assert not sim.fire("callback_timeout")
    sim.check("CANCELLED")


# -- routing ---------------------------------------------------------------------

def test_a_join_with_a_branch_not_taken_runs_with_the_other() -> None:
    sim = Sim("""path: t/join
version: 1
steps:
  - {name: split, tool: {kind: noop}, next: [{step: left, when: "workload.left"}, {step: right}]}
  - {name: left, tool: {kind: noop, result: L}, next: [{step: merge}]}
  - {name: right, tool: {kind: noop, result: R}, next: [{step: merge}]}
  - {name: merge, join: [left, right], tool: {kind: noop, result: "{{ steps.right.result }}"}}""", {"left": False})
    sim.drive()
    assert sim.results() == {"split": None, "right": "R", "merge": "R"}
    entered = [env.payload for _, env in sim.wal if env.type == "step.enter" and env.step == "merge"]
    assert entered == [{"from": "right"}]
    sim.check("COMPLETED")


def test_a_when_that_raises_fails_the_execution_with_a_clear_message() -> None:
    sim = Sim("""path: t/when
version: 1
steps:
  - {name: a, tool: {kind: noop}, next: [{step: b, when: "workload.n + 1 > 0"}]}
  - {name: b, tool: {kind: noop}}""")
    sim.drive()
    error = sim.wal[-1].env.payload["error"]
    assert error["type"] == "expression" and error["message"].startswith("a.next[0].when: unsupported operand")
    assert "b" not in sim.state.steps
    assert sim.check("FAILED").error == error


def test_a_template_that_fails_at_render_fails_the_step() -> None:
    sim = Sim("""path: t/render
version: 1
steps:
  - {name: a, tool: {kind: noop, result: "{{ 10 / workload.zero }}"}}""", {"zero": 0})
    assert not sim.commands and sim.state.steps["a"].status == FAILED
    error = sim.state.steps["a"].error
    assert error["type"] == "template" and "division by zero" in error["message"]
    assert sim.types()[-2:] == [("step.failed", "a"), ("execution.failed", None)]
    sim.check("FAILED")


def test_fail_unstartable_fails_the_execution_once() -> None:
    request = event("execution.requested", {"playbook": {"path": "missing/pb"}})
    state = new_state(request)
    assert not fail_unstartable(state, "no playbook")  # not requested yet
    apply(state, 1, request)
    failed = fail_unstartable(state, "not found")
    error = {"type": "playbook", "message": "not found"}
    assert [(e.type, e.event_id, e.payload) for e in failed.events] == [
        ("execution.failed", f"{EXEC}:failed", {"error": error})
    ]
    assert state.status == "FAILED" and not failed.commands and not failed.timers
    assert not fail_unstartable(state, "again") and not plan(state, playbook("linear"), now_ms=0, new_token=str)

