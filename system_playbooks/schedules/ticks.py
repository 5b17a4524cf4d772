"""When a schedule fires: its ticks, what a firer does with the ticks due now, and a tick's execution id.

Pure functions of a :class:`~system_playbooks.schedules.spec.Schedule`, the
last tick handled and the time; no I/O, so every kernel that looks at a
schedule decides the same (the kernel's firer does the I/O).

A tick is an instant in Unix milliseconds: for ``every``, each multiple of the
interval since the Unix epoch (so every kernel agrees without sharing an
anchor); for ``cron``, each match of the expression in the schedule's time zone
(across DST as cron does: a local time the clocks skip fires when they jump
past it, 03:00 for 02:30; a local time that happens twice fires the first time).

The ticks after the last one handled and up to now are due. One at most
``grace_s`` old fires, however late (a lease that moved, a kernel that
restarted); older ones were missed: ``catchup: none`` skips them all,
``catchup: last`` fires the newest of them once and skips the rest.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import NamedTuple

from cronsim import CronSim

from locator.ids import EPOCH_MS, NODE_BITS, SEQ_BITS
from system_playbooks.schedules.spec import Schedule, zone

MAX_DUE = 1000  # due ticks handled per look (the rest wait for the next look)


class Tick(NamedTuple):
    """A due tick: ``fire`` it, or record it as skipped (missed, and not the one ``catchup: last`` runs)."""

    ms: int
    fire: bool


def _dt(ms: int, s: Schedule) -> datetime:
    return datetime.fromtimestamp(ms / 1000, zone(s.timezone) if s.cron else timezone.utc)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def ticks_after(s: Schedule, after_ms: int, until_ms: int, *, limit: int = MAX_DUE) -> list[int]:
    """The schedule's ticks in ``(after_ms, until_ms]``, ascending, at most ``limit``.

    >>> from system_playbooks.schedules.spec import PlaybookRef
    >>> every2 = Schedule(id="s", tenant="t", project="p", playbook=PlaybookRef(path="a"), every_s=2)
    >>> ticks_after(every2, 1000, 7000)
    [2000, 4000, 6000]
    """
    out: list[int] = []
    if s.every_s is not None:
        period = s.every_s * 1000
        tick = (after_ms // period + 1) * period
        while tick <= until_ms and len(out) < limit:
            out.append(tick)
            tick += period
        return out
    assert s.cron is not None
    for dt in CronSim(s.cron, _dt(after_ms, s)):
        tick = _ms(dt)
        if tick <= after_ms:
            continue  # cronsim counts whole seconds: a sub-second start can yield its own second
        if tick > until_ms or len(out) >= limit:
            break
        out.append(tick)
    return out


def latest_tick(s: Schedule, after_ms: int, until_ms: int) -> int | None:
    """The newest tick in ``(after_ms, until_ms]``, or None."""
    if until_ms <= after_ms:
        return None
    if s.every_s is not None:
        period = s.every_s * 1000
        tick = until_ms // period * period
        return tick if tick > after_ms else None
    assert s.cron is not None
    try:
        # Reverse iteration yields ticks strictly before its start (to the second): start 1 ms past until_ms.
        tick = _ms(next(iter(CronSim(s.cron, _dt(until_ms + 1, s), reverse=True))))
    except StopIteration:
        return None
    return tick if after_ms < tick <= until_ms else None


def next_tick(s: Schedule, after_ms: int) -> int | None:
    """The first tick after ``after_ms`` (None when a cron expression has none left)."""
    if s.every_s is not None:
        return ticks_after(s, after_ms, after_ms + s.every_s * 1000, limit=1)[0]
    assert s.cron is not None
    try:
        return _ms(next(iter(CronSim(s.cron, _dt(after_ms, s)))))
    except StopIteration:
        return None


def due(s: Schedule, *, last_tick_ms: int | None, now_ms: int) -> list[Tick]:
    """The ticks to handle now, in order: the missed ones' verdict (per ``catchup``), then the recent ones.

    ``last_tick_ms`` is the newest tick already handled (fired or skipped); no tick at or before
    ``s.not_before_ms`` (the creation or the last resume) is ever due.
    """
    floor = max(last_tick_ms if last_tick_ms is not None else 0, s.not_before_ms)
    recent_from = max(floor, now_ms - s.grace_s * 1000)
    out: list[Tick] = []
    missed = latest_tick(s, floor, recent_from) if recent_from > floor else None
    if missed is not None:
        out.append(Tick(missed, fire=s.catchup == "last"))
    out += [Tick(ms, fire=True) for ms in ticks_after(s, recent_from, now_ms)]
    return out


def fires(s: Schedule, *, previous_running: bool) -> bool:
    """Whether a due tick starts an execution: always with ``overlap: allow``; with ``skip``, only when the
    previous tick's execution has ended."""
    return s.overlap == "allow" or not previous_running


def tick_execution_id(s: Schedule, tick_ms: int) -> str:
    """The execution id of ``s``'s tick at ``tick_ms``: the same on every kernel and every retry.

    A snowflake whose time is the tick's (plus a sub-second offset) and whose node and sequence bits come from
    a hash of the schedule and the tick, so ids of one tick of different schedules differ and ids stay time-ordered.

    >>> from system_playbooks.schedules.spec import PlaybookRef
    >>> s = Schedule(id="s", tenant="t", project="p", playbook=PlaybookRef(path="a"), every_s=2)
    >>> tick_execution_id(s, 1_800_000_000_000) == tick_execution_id(s, 1_800_000_000_000)
    True
    """
    digest = int.from_bytes(hashlib.blake2b(f"{s.key}@{tick_ms}".encode(), digest_size=8).digest(), "big")
    low = digest & ((1 << (NODE_BITS + SEQ_BITS)) - 1)
    ms = tick_ms - EPOCH_MS + (digest >> 32) % 1000
    return str((ms << (NODE_BITS + SEQ_BITS)) | low)


def tick_event_id(execution_id: str) -> str:
    """The ``event_id`` (so the ``Nats-Msg-Id``) of a tick's ``execution.requested``."""
    return f"{execution_id}:requested"
