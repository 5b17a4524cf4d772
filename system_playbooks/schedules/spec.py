"""What a schedule is: the request that creates one (:class:`ScheduleSpec`) and its stored form (:class:`Schedule`).

A schedule starts a registered playbook with a workload at each tick of a cron
expression in a time zone, or every N seconds. :func:`check_spec` turns a
request into the stored form or raises :class:`ScheduleInvalid` naming the
field; nothing is stored before it passed.

>>> s = check_spec(ScheduleSpec(id="nightly", cron="0 2 * * *", timezone="Europe/Berlin",
...                             playbook=PlaybookRef(path="etl/daily")), tenant="acme", project="web", now_ms=0)
>>> s.cron, s.timezone, s.overlap, s.catchup
('0 2 * * *', 'Europe/Berlin', 'skip', 'none')
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from locator.names import NAME_PATTERN, check_name
from system_playbooks.orchestrate.playbook import PATH_PATTERN

Overlap = Literal["skip", "allow"]
Catchup = Literal["none", "last"]

MAX_EVERY_S = 366 * 86400
MAX_GRACE_S = 86400
MAX_WORKLOAD = 32 * 1024
_EVERY_RE = re.compile(r"^([1-9][0-9]{0,8})(s|m|h|d)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ScheduleInvalid(ValueError):
    """A schedule request breaks a rule; ``field`` names where (``cron``, ``timezone``, ``every``…)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class PlaybookRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The playbook a schedule starts: a catalog path and a version (the latest at each tick when None)."""

    path: Annotated[str, msgspec.Meta(pattern=PATH_PATTERN, max_length=255)]
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A create request (the API body, the CLI's flags): ``cron`` (with ``timezone``) or ``every``, not both."""

    id: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    playbook: PlaybookRef
    cron: str | None = None
    timezone: str = "UTC"
    every: str | int | None = None
    workload: dict[str, Any] = msgspec.field(default_factory=dict)
    affinity: str = ""
    overlap: Overlap = "skip"
    catchup: Catchup = "none"
    grace_s: Annotated[int, msgspec.Meta(ge=1, le=MAX_GRACE_S)] = 60
    paused: bool = False


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """The stored form (KV ``schedules``, key ``def.<tenant>.<project>.<id>``), canonical JSON.

    ``not_before_ms`` is when the schedule was created or last resumed: no tick at or before it fires.
    """

    id: str
    tenant: str
    project: str
    playbook: PlaybookRef
    affinity: str = ""
    cron: str | None = None
    timezone: str = "UTC"
    every_s: int | None = None
    workload: dict[str, Any] = msgspec.field(default_factory=dict)
    overlap: Overlap = "skip"
    catchup: Catchup = "none"
    grace_s: int = 60
    paused: bool = False
    not_before_ms: int = 0
    created_at: str = ""
    updated_at: str = ""

    @property
    def key(self) -> str:
        """``<tenant>.<project>.<id>``: the schedule's name in keys, logs and derived ids."""
        return f"{self.tenant}.{self.project}.{self.id}"


def iso_ms(ms: int) -> str:
    """Unix milliseconds as ``2026-11-22T08:00:00.000Z``."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_every(value: str | int) -> int:
    """``every`` in seconds: an integer, or a number with a unit ``s``, ``m``, ``h`` or ``d``.

    >>> parse_every("2s"), parse_every("15m"), parse_every(90)
    (2, 900, 90)
    """
    text = str(value).strip()
    match = _EVERY_RE.fullmatch(text) if not isinstance(value, bool) else None
    if match is None:
        raise ScheduleInvalid(f"every must be a whole number of seconds or like '2s', '15m', '1h', '1d', got {str(value)[:40]!r}",
                              field="every")  # fmt: skip
    seconds = int(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if seconds > MAX_EVERY_S:
        raise ScheduleInvalid(f"every is {seconds} s, over the {MAX_EVERY_S} s (366 days) limit", field="every")
    return seconds


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`ScheduleInvalid` if there is none by that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleInvalid(f"unknown time zone {name[:80]!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'",
                              field="timezone") from None  # fmt: skip


def check_cron(expr: str, tz: ZoneInfo) -> None:
    """Raise :class:`ScheduleInvalid` unless ``expr`` parses and has a tick within the next 50 years."""
    try:
        next(iter(CronSim(expr, datetime.now(tz))))
    except CronSimError as e:
        raise ScheduleInvalid(f"bad cron expression {expr[:80]!r}: {e} (5 fields, or 6 with seconds last)", field="cron") from None
    except StopIteration:
        raise ScheduleInvalid(f"cron expression {expr[:80]!r} never fires", field="cron") from None


def check_spec(spec: ScheduleSpec, *, tenant: str, project: str, now_ms: int) -> Schedule:
    """The stored form of ``spec`` (created now), or :class:`ScheduleInvalid` naming the first bad field."""
    check_name("tenant", tenant)
    check_name("project", project)
    try:
        check_name("affinity", spec.affinity, allow_empty=True)
    except ValueError as e:
        raise ScheduleInvalid(str(e), field="affinity") from None
    if (spec.cron is None) == (spec.every is None):
        raise ScheduleInvalid("give exactly one of cron (with timezone) or every", field="cron" if spec.cron else "every")
    every_s = None
    if spec.cron is not None:
        check_cron(spec.cron, zone(spec.timezone))
    else:
        assert spec.every is not None
        every_s = parse_every(spec.every)
        if spec.timezone != "UTC":
            raise ScheduleInvalid("timezone applies to cron only (every counts seconds from the Unix epoch)", field="timezone")
    if len(msgspec.json.encode(spec.workload)) > MAX_WORKLOAD:
        raise ScheduleInvalid(f"workload is over {MAX_WORKLOAD} bytes as JSON", field="workload")
    now = iso_ms(now_ms)
    return Schedule(
        id=spec.id, tenant=tenant, project=project, playbook=spec.playbook, affinity=spec.affinity, cron=spec.cron,
        timezone=spec.timezone, every_s=every_s, workload=spec.workload, overlap=spec.overlap, catchup=spec.catchup,
        grace_s=spec.grace_s, paused=spec.paused, not_before_ms=now_ms, created_at=now, updated_at=now,
    )  # fmt: skip
