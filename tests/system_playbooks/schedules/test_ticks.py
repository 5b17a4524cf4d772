"""Schedules without NATS: validation, ticks (interval and cron in a zone), catch-up, overlap, derived ids."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import msgspec
import pytest

from locator.ids import timestamp_ms_of
from locator.names import check_execution_id
from system_playbooks.schedules.spec import PlaybookRef, Schedule, ScheduleInvalid, ScheduleSpec, check_spec, parse_every
from system_playbooks.schedules.ticks import Tick, due, fires, latest_tick, next_tick, tick_execution_id, ticks_after

REF = PlaybookRef(path="etl/daily")
T0 = int(datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc).timestamp() * 1000)


def spec(**fields: object) -> ScheduleSpec:
    return msgspec.convert({"id": "s1", "playbook": {"path": "etl/daily"}, **fields}, ScheduleSpec)


def every(seconds: int, **fields: object) -> Schedule:
    return check_spec(spec(every=f"{seconds}s", **fields), tenant="acme", project="web", now_ms=T0)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"cron": "61 * * * *"}, "cron", "Bad minute"),
        ({"cron": "* * *"}, "cron", "Wrong number of fields"),
        ({"cron": "0 0 30 2 *"}, "cron", "cron"),
        ({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "timezone", "unknown time zone 'Mars/Olympus'"),
        ({"cron": "0 2 * * *", "timezone": "../../etc/passwd"}, "timezone", "unknown time zone"),
        ({}, "every", "exactly one of cron"),
        ({"cron": "* * * * *", "every": "2s"}, "cron", "exactly one of cron"),
        ({"every": "2 weeks"}, "every", "like '2s'"),
        ({"every": "0s"}, "every", "like '2s'"),
        ({"every": "400d"}, "every", "366 days"),
        ({"every": "2s", "timezone": "Europe/Berlin"}, "timezone", "cron only"),
        ({"every": "2s", "affinity": "EU"}, "affinity", "invalid affinity"),
        ({"every": "2s", "workload": {"x": "y" * 40_000}}, "workload", "over"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(fields: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ScheduleInvalid) as e:
        check_spec(spec(**fields), tenant="acme", project="web", now_ms=T0)
    assert e.value.field == field and words in str(e.value)


@pytest.mark.parametrize("fields", [{"overlap": "sometimes"}, {"catchup": "all"}, {"grace_s": 0}, {"bogus": 1}, {"id": "No.Dots"}])
def test_the_request_struct_refuses_unknown_values(fields: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        spec(every="2s", **fields)


def test_every_units() -> None:
    assert [parse_every(v) for v in ("2s", "3m", "1h", "1d", 45, "7")] == [2, 180, 3600, 86400, 45, 7]


def test_interval_ticks_are_multiples_since_the_epoch() -> None:
    s = every(2)
    assert ticks_after(s, T0 + 500, T0 + 6000) == [T0 + 2000, T0 + 4000, T0 + 6000]
    assert latest_tick(s, T0, T0 + 5999) == T0 + 4000
    assert latest_tick(s, T0 + 4000, T0 + 5999) is None
    assert next_tick(s, T0 + 1) == T0 + 2000


def test_cron_ticks_follow_the_time_zone_across_dst() -> None:
    # 02:30 every day in Berlin. On 2026-03-29 the clocks jump from 02:00 to 03:00: that day's tick is at 03:00
    # (cron's rule for a skipped time). On 2026-10-25 02:30 happens twice: it fires once, the first time.
    s = check_spec(spec(cron="30 2 * * *", timezone="Europe/Berlin"), tenant="acme", project="web", now_ms=T0)
    start = int(datetime(2026, 3, 27, tzinfo=timezone.utc).timestamp() * 1000)
    until = int(datetime(2026, 3, 31, tzinfo=timezone.utc).timestamp() * 1000)
    local = [datetime.fromtimestamp(t / 1000, ZoneInfo("Europe/Berlin")) for t in ticks_after(s, start, until)]
    assert [(d.day, d.hour, d.minute) for d in local] == [(27, 2, 30), (28, 2, 30), (29, 3, 0), (30, 2, 30)]
    assert latest_tick(s, start, until) == ticks_after(s, start, until)[-1]
    autumn = int(datetime(2026, 10, 25, tzinfo=timezone.utc).timestamp() * 1000)
    utc = [datetime.fromtimestamp(t / 1000, timezone.utc) for t in ticks_after(s, autumn, autumn + 86_400_000)]
    assert [(d.hour, d.minute) for d in utc] == [(0, 30)]  # 02:30 CEST; not again at 02:30 CET (01:30 UTC)


def test_due_ticks_within_the_grace_fire_late() -> None:
    s = every(2, grace_s=10)
    # A lease moved: the last handled tick is 3 behind, all within the grace: each fires, in order.
    assert due(s, last_tick_ms=T0 + 2000, now_ms=T0 + 8500) == [Tick(T0 + 4000, True), Tick(T0 + 6000, True), Tick(T0 + 8000, True)]
    assert due(s, last_tick_ms=T0 + 8000, now_ms=T0 + 8500) == []


def test_catchup_none_skips_what_was_missed_and_last_fires_the_newest_once() -> None:
    down_until = T0 + 60_000  # every 2 s with a 3 s grace, nothing handled for a minute
    none = every(2, grace_s=3)
    assert due(none, last_tick_ms=T0 + 2000, now_ms=down_until) == [
        Tick(T0 + 56_000, False), Tick(T0 + 58_000, True), Tick(T0 + 60_000, True)
    ]
    last = every(2, grace_s=3, catchup="last")
    assert due(last, last_tick_ms=T0 + 2000, now_ms=down_until) == [
        Tick(T0 + 56_000, True), Tick(T0 + 58_000, True), Tick(T0 + 60_000, True)
    ]


def test_nothing_at_or_before_creation_or_resume_is_due() -> None:
    s = every(2)  # created at T0, a tick instant
    assert due(s, last_tick_ms=None, now_ms=T0) == []
    assert due(s, last_tick_ms=None, now_ms=T0 + 2000) == [Tick(T0 + 2000, True)]
    resumed = msgspec.structs.replace(s, not_before_ms=T0 + 30_000, catchup="last")
    assert due(resumed, last_tick_ms=T0 + 2000, now_ms=T0 + 31_000) == []


def test_overlap() -> None:
    assert fires(every(2), previous_running=False) and not fires(every(2), previous_running=True)
    assert fires(every(2, overlap="allow"), previous_running=True)


def test_tick_execution_ids_are_stable_distinct_and_time_ordered() -> None:
    a, b = every(2), check_spec(spec(id="s2", every="2s"), tenant="acme", project="web", now_ms=T0)
    ids = [tick_execution_id(a, T0 + k * 2000) for k in range(500)]
    assert ids == [tick_execution_id(a, T0 + k * 2000) for k in range(500)]
    assert all(check_execution_id(i) for i in ids) and [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert all(0 <= timestamp_ms_of(int(i)) - (T0 + k * 2000) < 1000 for k, i in enumerate(ids))
    assert not set(ids) & {tick_execution_id(b, T0 + k * 2000) for k in range(500)}
