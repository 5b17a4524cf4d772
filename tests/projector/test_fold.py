"""Every fold rule of the design, one test (or case) each."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locator import new_event
from locator.envelope import KNOWN_TYPES, Envelope
from projector.errors import FoldError
from projector.fold import WalEvent, fold
from projector.projection import (
    USER_EVENTS_KEPT,
    USER_PAYLOAD_BUDGET,
    Projection,
    UserEvent,
    canonical,
    decode_projection,
)


def ev(type: str, seq: int, *, step: str | None = None, attempt: int | None = None, ts: str | None = None, **payload: Any) -> WalEvent:
    env = new_event(
        tenant="acme", project="web", execution_id="42", type=type, step=step, attempt=attempt,
        payload=payload, ts=ts or f"2026-11-22T08:00:{seq % 60:02d}.000Z",
    )
    return WalEvent(seq, env)


def run(*events: WalEvent) -> Projection:
    p = fold(None, events)
    assert p is not None
    return p


def test_first_event_of_any_type_creates_a_pending_projection() -> None:
    for kind in sorted(KNOWN_TYPES - {"execution.started", "step.enter", "command.issued", "command.claimed",
                                      "command.completed", "step.exit", "callback.received", "callback.waiting",
                                      "execution.completed", "execution.failed", "execution.cancelled"}) + ["user.hello"]:
        p = run(ev(kind, 5, step="s"))
        assert p.status == "PENDING", kind
        assert (p.execution_id, p.tenant, p.project, p.affinity) == ("42", "acme", "web", "")
        assert p.created_at == p.updated_at == "2026-11-22T08:00:05.000Z"
        assert p.last_seq == 5 and p.event_count == 1


def test_execution_requested_sets_playbook_and_workload() -> None:
    p = run(ev("execution.requested", 1, playbook={"path": "demo/x", "version": 2}, workload={"n": 1}))
    assert p.playbook == {"path": "demo/x", "version": 2} and p.workload == {"n": 1}


@pytest.mark.parametrize(
    ("playbook", "workload"), [("demo/x", [1, 2]), (7, "w"), (["demo/x"], None), (None, 3)]
)
def test_a_requested_execution_with_non_object_playbook_or_workload_folds_them_as_absent(
    playbook: Any, workload: Any
) -> None:
    # Anyone can publish execution.requested: a projection that cannot be decoded again would block
    # every later event of the execution.
    p = run(ev("execution.requested", 1, playbook=playbook, workload=workload), ev("user.note", 2))
    assert p.playbook is None and p.workload == {} and p.event_count == 2
    assert decode_projection(canonical(p)) == p


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("execution.started", "RUNNING"),
        ("step.enter", "RUNNING"),
        ("command.issued", "RUNNING"),
        ("command.claimed", "RUNNING"),
        ("command.completed", "RUNNING"),
        ("step.exit", "RUNNING"),
        ("callback.received", "RUNNING"),
        ("callback.waiting", "WAITING"),
        ("execution.completed", "COMPLETED"),
        ("execution.failed", "FAILED"),
        ("execution.cancelled", "CANCELLED"),
        ("call.error", "PENDING"),
        ("step.retry", "PENDING"),
        ("step.failed", "PENDING"),
        ("execution.cancel_requested", "PENDING"),
        ("user.note", "PENDING"),
    ],
)
def test_execution_status_by_event_type(kind: str, status: str) -> None:
    p = run(ev("execution.requested", 1), ev(kind, 2, step="s", attempt=1))
    assert p.status == status


@pytest.mark.parametrize("terminal", ["execution.completed", "execution.failed", "execution.cancelled"])
def test_terminal_status_is_sticky(terminal: str) -> None:
    p = run(ev("execution.started", 1), ev(terminal, 2))
    after = fold(p, [ev(k, 3 + i, step="s") for i, k in enumerate(
        ["step.enter", "callback.waiting", "execution.started", "execution.completed", "execution.failed", "execution.cancelled"]
    )])
    assert after is not None and after.status == p.status and after.event_count == 8


def test_waiting_then_running_again() -> None:
    p = run(ev("step.enter", 1, step="cb"), ev("callback.waiting", 2, step="cb"))
    assert p.status == "WAITING" and p.steps["cb"].status == "WAITING"
    p2 = fold(p, [ev("callback.received", 3, step="cb")])
    assert p2 is not None and p2.status == "RUNNING" and p2.steps["cb"].status == "RUNNING"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("step.enter", "RUNNING"),
        ("command.issued", "RUNNING"),
        ("command.claimed", "RUNNING"),
        ("step.exit", "COMPLETED"),
        ("call.error", "ERROR"),
        ("step.retry", "RETRYING"),
        ("step.failed", "FAILED"),
        ("callback.waiting", "WAITING"),
        ("callback.received", "RUNNING"),
    ],
)
def test_step_status_by_event_type(kind: str, status: str) -> None:
    p = run(ev(kind, 1, step="fetch", attempt=1))
    assert p.steps["fetch"].status == status


def test_command_completed_leaves_step_status_unchanged() -> None:
    p = run(ev("step.enter", 1, step="a", attempt=1), ev("step.exit", 2, step="a", attempt=1, result=7),
            ev("command.completed", 3, step="a", attempt=1))
    assert p.steps["a"].status == "COMPLETED" and p.steps["a"].result == 7


@pytest.mark.parametrize("end", ["step.exit", "step.failed"])
@pytest.mark.parametrize("late", ["step.enter", "command.issued", "command.claimed", "step.exit", "call.error",
                                  "step.retry", "callback.waiting", "callback.received"])
def test_a_finished_step_stays_finished(end: str, late: str) -> None:
    # A late report (a redelivered command, another iteration of a failed loop) is counted, never reopens the step.
    done = run(ev("step.enter", 1, step="a", attempt=1), ev(end, 2, step="a", attempt=1, result=7, error="e"))
    after = run(ev("step.enter", 1, step="a", attempt=1), ev(end, 2, step="a", attempt=1, result=7, error="e"),
                ev(late, 3, step="a", attempt=2, result=8, error="late"))
    before, now = done.steps["a"], after.steps["a"]
    assert (now.status, now.result, now.error, now.ended_at) == (before.status, before.result, before.error, before.ended_at)
    assert now.attempts == 2 and after.event_count == 3


def test_step_exit_records_result_and_times() -> None:
    enter = ev("step.enter", 1, step="a", attempt=1, ts="2026-11-22T08:00:01.000Z")
    exit_ = ev("step.exit", 2, step="a", attempt=1, ts="2026-11-22T08:00:09.000Z", result={"rows": 3})
    s = run(enter, exit_).steps["a"]
    assert (s.started_at, s.ended_at, s.result, s.error) == ("2026-11-22T08:00:01.000Z", "2026-11-22T08:00:09.000Z", {"rows": 3}, None)


def test_step_exit_with_result_ref() -> None:
    env = new_event(tenant="acme", project="web", execution_id="42", type="step.exit", step="big", attempt=1,
                    result_ref="noetl://acme/web/executions/42/results/big/1")
    s = run(WalEvent(1, env)).steps["big"]
    assert s.status == "COMPLETED" and s.result is None and s.result_ref == "noetl://acme/web/executions/42/results/big/1"


def test_errors_retries_and_failure() -> None:
    p = run(
        ev("step.enter", 1, step="a", attempt=1),
        ev("call.error", 2, step="a", attempt=1, error="boom"),
        ev("step.retry", 3, step="a", attempt=2),
        ev("step.enter", 4, step="a", attempt=2),
        ev("call.error", 5, step="a", attempt=2, error={"code": 500}),
        ev("step.failed", 6, step="a", attempt=2, error="gave up"),
        ev("execution.failed", 7, error="step a failed"),
    )
    s = p.steps["a"]
    assert (s.status, s.attempts, s.error, s.ended_at) == ("FAILED", 2, "gave up", "2026-11-22T08:00:06.000Z")
    assert p.status == "FAILED" and p.error == "step a failed"


def test_error_then_success_clears_error() -> None:
    p = run(ev("call.error", 1, step="a", attempt=1, error="x"), ev("step.exit", 2, step="a", attempt=2, result=1))
    assert p.steps["a"].error is None and p.steps["a"].attempts == 2


def test_attempts_is_the_highest_seen() -> None:
    p = run(ev("step.enter", 1, step="a", attempt=3), ev("command.issued", 2, step="a", attempt=1),
            ev("command.claimed", 3, step="a"))
    assert p.steps["a"].attempts == 3


def test_cancel_requested_is_recorded() -> None:
    p = run(ev("execution.started", 1), ev("execution.cancel_requested", 2))
    assert p.cancel_requested and p.status == "RUNNING"
    done = fold(p, [ev("execution.cancelled", 3)])
    assert done is not None and done.status == "CANCELLED"


def test_step_events_without_step_name_touch_no_step() -> None:
    p = run(ev("step.enter", 1))
    assert p.steps == {} and p.status == "RUNNING" and p.event_count == 1


def test_duplicates_and_old_sequences_are_skipped() -> None:
    e1, e2 = ev("step.enter", 10, step="a", attempt=1), ev("step.exit", 11, step="a", attempt=1, result=1)
    p = run(e1, e2)
    again = fold(p, [e1, e2, e1, ev("user.late", 9)])
    assert again is not None and canonical(again) == canonical(p)
    assert (p.event_count, p.last_seq) == (2, 11)


def test_user_events_are_counted_bounded_and_not_interpreted() -> None:
    events = [ev("user.tick", i + 1, step="a", n=i) for i in range(USER_EVENTS_KEPT + 25)]
    p = run(*events)
    assert p.status == "PENDING" and p.steps == {}
    assert p.user_event_count == USER_EVENTS_KEPT + 25 == p.event_count
    assert len(p.user_events) == USER_EVENTS_KEPT and p.user_events[0].payload == {"n": 25}
    assert p.user_events[-1].seq == USER_EVENTS_KEPT + 25


def test_fold_is_pure() -> None:
    p = run(ev("step.enter", 1, step="a", attempt=1))
    before = canonical(p)
    fold(p, [ev("step.exit", 2, step="a", attempt=1, result=1)])
    assert canonical(p) == before


def test_incremental_equals_whole() -> None:
    events = [ev(k, i + 1, step=f"s{i % 3}", attempt=1 + i % 2, v=i) for i, k in enumerate(
        ["execution.requested", "execution.started", "step.enter", "command.issued", "call.error", "step.retry",
         "step.enter", "step.exit", "user.x", "callback.waiting", "callback.received", "step.exit", "execution.completed"]
    )]
    whole = run(*events)
    p: Projection | None = None
    for i in range(0, len(events), 4):
        p = fold(p, events[i:i + 4])
    assert p is not None and canonical(p) == canonical(whole)


def test_identity_is_checked() -> None:
    p = run(ev("step.enter", 1))
    other = new_event(tenant="acme", project="web", execution_id="43", type="step.enter")
    with pytest.raises(FoldError, match="cannot be folded"):
        fold(p, [WalEvent(2, other)])


def test_canonical_round_trip_and_key_order() -> None:
    p = run(ev("execution.requested", 1, workload={"z": 1, "a": {"y": 2, "b": 3}}), ev("step.exit", 2, step="s", attempt=1, result={"k2": 1, "k1": 2}))
    data = canonical(p)
    assert decode_projection(data) == p and canonical(decode_projection(data)) == data
    assert data.index(b'"a":{"b":3,"y":2}') < data.index(b'"z":1')
    for field in (b'"execution_id"', b'"status"', b'"steps"', b'"last_seq"', b'"event_count"', b'"created_at"', b'"updated_at"', b'"playbook"', b'"workload"'):
        assert field in data


def test_empty_fold() -> None:
    assert fold(None, []) is None


# --------------------------------------------------------------------------- user payloads within a byte budget


def big(seq: int, size: int, type: str = "user.blob") -> WalEvent:
    """A user event whose payload encodes to exactly ``size`` bytes (``{"b":"…"}`` is 8 bytes plus the text)."""
    return ev(type, seq, b="x" * (size - 8))


def test_user_payloads_are_kept_within_the_byte_budget_newest_first() -> None:
    sixty = 60_000
    p = run(*(big(seq, sixty) for seq in range(1, 21)))
    kept_whole = USER_PAYLOAD_BUDGET // sixty  # 4 of 60 KB fit 256 KiB, a fifth does not
    assert [e.payload_omitted for e in p.user_events] == [True] * (20 - kept_whole) + [False] * kept_whole
    assert all(e.payload_bytes == sixty for e in p.user_events)
    assert all(e.payload == {} for e in p.user_events if e.payload_omitted)
    assert all(len(e.payload["b"]) == sixty - 8 for e in p.user_events if not e.payload_omitted)
    assert [e.seq for e in p.user_events] == list(range(1, 21)) and p.user_event_count == 20
    # What was dropped says so in the served JSON: seq, type, ts and size stay; the payload is {}.
    first = json.loads(canonical(p))["user_events"][0]
    assert first == {"payload": {}, "payload_bytes": sixty, "payload_omitted": True, "seq": 1,
                     "ts": "2026-11-22T08:00:01.000Z", "type": "user.blob"}  # fmt: skip
    assert sum(e.payload_bytes for e in p.user_events if not e.payload_omitted) <= USER_PAYLOAD_BUDGET


def test_a_small_event_after_an_omitted_one_keeps_its_payload_and_the_budget_is_a_suffix() -> None:
    # The newest events keep their payloads while they fit; an event over the budget on its own is omitted
    # even when newest, and so is every older one: omitted events are always the oldest.
    p = run(big(1, 100), big(2, USER_PAYLOAD_BUDGET + 1), big(3, 50))
    assert [e.payload_omitted for e in p.user_events] == [True, True, False]
    p = run(big(1, 100), big(2, USER_PAYLOAD_BUDGET - 100), big(3, 100))
    assert [e.payload_omitted for e in p.user_events] == [True, False, False]
    p = run(big(1, 100), big(2, USER_PAYLOAD_BUDGET - 200), big(3, 100))
    assert [e.payload_omitted for e in p.user_events] == [False, False, False]


def test_a_projection_stored_before_payload_sizes_is_measured_and_bounded_on_its_next_fold() -> None:
    events = [big(seq, 60_000) for seq in range(1, 8)]
    old = run(*events)
    # As the fold before the budget stored it: every payload whole, no size (decoded with the defaults).
    old.user_events = [UserEvent(seq=w.seq, type=w.env.type, ts=w.env.ts, payload=w.env.payload) for w in events]
    old = decode_projection(canonical(old).replace(b',"payload_bytes":0,"payload_omitted":false', b""))
    assert all(e.payload_bytes == 0 and not e.payload_omitted for e in old.user_events)
    then = fold(old, [ev("step.enter", 8, step="a")])
    assert then is not None and canonical(then) == canonical(run(*events, ev("step.enter", 8, step="a")))


_kinds = st.sampled_from(["user.a", "user.b.c", "step.enter", "step.exit", "execution.started", "call.error"])
_sizes = st.one_of(st.integers(8, 300), st.integers(20_000, 70_000), st.just(USER_PAYLOAD_BUDGET + 1))


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(st.tuples(_kinds, _sizes), min_size=1, max_size=130),
    cuts=st.lists(st.integers(0, 130), max_size=6),
    through_kv=st.booleans(),
)
def test_folding_in_any_batches_equals_folding_at_once_with_big_payloads(
    spec: list[tuple[str, int]], cuts: list[int], through_kv: bool
) -> None:
    events = [big(seq, size, kind) if kind.startswith("user.") else ev(kind, seq, step="s", attempt=1)
              for seq, (kind, size) in enumerate(spec, start=1)]  # fmt: skip
    whole = run(*events)
    p: Projection | None = None
    bounds = sorted({0, len(events), *(c for c in cuts if c <= len(events))})
    for start, end in zip(bounds, bounds[1:], strict=False):
        p = fold(p, events[start:end])
        if through_kv and p is not None:
            p = decode_projection(canonical(p))  # as the project plug-in reads it back from KV
    assert p is not None and canonical(p) == canonical(whole)
    kept = whole.user_events
    assert len(kept) <= USER_EVENTS_KEPT
    assert sum(e.payload_bytes for e in kept if not e.payload_omitted) <= USER_PAYLOAD_BUDGET
    flags = [e.payload_omitted for e in kept]
    assert flags == sorted(flags, reverse=True)  # the omitted ones are the oldest
