"""``check``: every example run by the planner's simulator agrees with its own playbook; a changed
playbook, a changed decision, a cancel race, a re-published decision and a history cut short."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from locator.command import Command
from locator.envelope import Envelope
from projector.fold import WalEvent
from system_playbooks.orchestrate.check import check, is_decision
from system_playbooks.orchestrate.planner import Plan
from tests.system_playbooks.orchestrate import test_planner as planner_tests
from tests.system_playbooks.orchestrate.test_planner import EXEC, SCENARIOS, Sim, event, playbook


class WorkerSim(Sim):
    """The planner tests' simulator, with the worker's events carrying their command's id as a real worker's do."""

    worker = False

    def claim(self, command: Command, delivery: int = 1) -> Plan:
        self.worker = True
        try:
            return super().claim(command, delivery)
        finally:
            self.worker = False

    def report(self, command: Command, delivery: int = 1, **kw: Any) -> Plan:
        self.worker = True
        try:
            return super().report(command, delivery, **kw)
        finally:
            self.worker = False

    def deliver(self, env: Envelope) -> Plan:
        if self.worker:
            env = msgspec.structs.replace(env, causation_id=env.payload["command_id"])
        return super().deliver(env)


@pytest.fixture(autouse=True)
def worker_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner_tests, "Sim", WorkerSim)


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_example_agrees_with_its_playbook(name: str) -> None:
    sim = SCENARIOS[name]()
    report = check(sim.wal, sim.pb)
    assert report.divergence is None, report.divergence
    assert report.pending == [] and report.events == len(sim.wal)
    assert report.decisions == sum(is_decision(env) for _, env in sim.wal) > 3


def test_a_history_cut_short_shows_what_is_pending_not_a_divergence() -> None:
    sim = SCENARIOS["linear"]()
    cut = next(i for i, (_, env) in enumerate(sim.wal) if env.type == "step.exit")
    report = check(sim.wal[: cut + 1], sim.pb)
    assert report.divergence is None
    assert [(d.type, d.step) for d in report.pending] == [("step.enter", "second"), ("command.issued", "second")]


def test_a_decision_made_differently_is_named() -> None:
    sim = SCENARIOS["linear"]()
    i = next(i for i, (_, env) in enumerate(sim.wal) if (env.type, env.step) == ("step.enter", "second"))
    seq, env = sim.wal[i]
    forged = [*sim.wal[:i], WalEvent(seq, msgspec.structs.replace(env, payload={"from": "third"})), *sim.wal[i + 1 :]]
    report = check(forged, sim.pb)
    exit_first = next(s for s, env in sim.wal if (env.type, env.step) == ("step.exit", "first"))
    assert report.divergence is not None and report.divergence.seq == exit_first
    assert report.divergence.recorded.seq == seq
    assert "differently" in report.divergence.reason
    assert report.divergence.recorded.payload == {"from": "third"}
    assert [d.payload for d in report.divergence.expected] == [{"from": "first"}]


def test_a_changed_playbook_diverges_at_the_first_step_it_routes_otherwise() -> None:
    sim = SCENARIOS["when_false"]()
    changed = playbook((planner_tests.EXAMPLES / "when.yaml").read_text()
                       .replace('when: "workload.notify == true"', 'when: "true"').replace("version: 1", "version: 2"))
    report = check(sim.wal, changed)
    assert report.divergence is not None
    # Both arcs hold now: after check's end the playbook enters notify and done; the record entered done
    # only. That shows once the record goes on without notify (at its end), and names check's end.
    exit_check = next(seq for seq, env in sim.wal if (env.type, env.step) == ("step.exit", "check"))
    assert report.divergence.seq == exit_check and report.divergence.input is not None
    assert (report.divergence.input.type, report.divergence.input.step) == ("step.exit", "check")
    assert report.divergence.recorded.type == "execution.completed"
    assert [(d.type, d.step, d.due_after) for d in report.divergence.expected] == [
        ("step.enter", "notify", exit_check), ("command.issued", "notify", exit_check)]


def test_a_cancel_recorded_between_a_decision_and_its_events_is_no_divergence() -> None:
    sim = WarmSim()
    report = check(sim.wal, sim.pb)
    assert report.divergence is None, report.divergence


class WarmSim(WorkerSim):
    """parallel: the orchestrator decided to enter both branches; the cancel landed between its events."""

    def __init__(self) -> None:
        super().__init__("parallel")
        self.work()
        issued = [i for i, (_, env) in enumerate(self.wal) if env.type == "command.issued" and env.step == "right"]
        cancel = event("execution.cancel_requested", {"by": "test"}, event_id=f"{EXEC}:cancel")
        # Move the cancel before the last command.issued, as a race between two publishers stores it.
        i = issued[0]
        seqs = [seq for seq, _ in self.wal]
        envs = [env for _, env in self.wal]
        envs.insert(i, cancel)
        self.wal = [WalEvent(seq, env) for seq, env in zip([*seqs, seqs[-1] + 1], envs, strict=True)]


def test_a_re_published_decision_is_the_same_decision() -> None:
    sim = SCENARIOS["linear"]()
    seq, env = next(e for e in sim.wal if e.env.type == "step.enter")
    again = [*sim.wal, WalEvent(sim.wal[-1].seq + 1, env)]
    assert check(again, sim.pb).divergence is None


def test_worker_events_are_inputs_and_timers_are_not_decisions() -> None:
    report_of = {env.type: env for _, env in SCENARIOS["retry"]().wal}
    assert not is_decision(report_of["call.error"]) and not is_decision(report_of["command.claimed"])
    assert not is_decision(report_of["command.completed"])  # the retry backoff timer
    assert is_decision(report_of["step.retry"]) and is_decision(report_of["execution.completed"])
