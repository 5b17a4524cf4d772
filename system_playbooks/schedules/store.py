"""Schedules in NATS: the KV bucket ``schedules`` (global, like the catalog).

Keys (names never contain a dot, so they split back):

* ``def.<tenant>.<project>.<id>``: the :class:`~system_playbooks.schedules.spec.Schedule`, canonical JSON;
* ``tick.<tenant>.<project>.<id>``: the :class:`TickState`, the newest tick handled and the execution
  the last fired tick started, written compare-and-set by whichever kernel fires the schedule.

Deleting a schedule purges both keys.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from locator.names import check_name
from locator.subjects import SCHEDULES_BUCKET
from projector.historystats import stream_subjects
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.start import resolve_playbook
from system_playbooks.schedules.spec import Schedule, ScheduleSpec, check_spec, iso_ms
from system_playbooks.schedules.ticks import next_tick


class ScheduleStoreError(Exception):
    """The bucket is missing or an entry cannot be read."""


class ScheduleExists(ScheduleStoreError):
    """A schedule with this id exists in the tenant/project."""


class ScheduleConflict(ScheduleStoreError):
    """The entry changed since it was read: nothing was written."""


class TickState(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule's progress: the newest tick handled (fired or skipped) and the execution of the last fired one."""

    tick_ms: int
    execution_id: str | None = None
    fired_ms: int | None = None


class ScheduleView(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as the API and the CLI show it: the definition and where it stands."""

    schedule: Schedule
    next_tick: str | None
    last_tick: str | None
    last_execution_id: str | None


_encode = msgspec.json.Encoder(order="sorted")
_schedule = msgspec.json.Decoder(Schedule)
_tick = msgspec.json.Decoder(TickState)


class ScheduleStore:
    """Schedules and their tick states in KV ``schedules``.

    >>> async def demo(js: JetStreamContext, schedule: Schedule) -> None:
    ...     store = await ScheduleStore.open(js)
    ...     await store.create(schedule)
    ...     assert [s.id for s in await store.list(schedule.tenant, schedule.project)] == [schedule.id]
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> ScheduleStore:
        try:
            return cls(js, await js.key_value(SCHEDULES_BUCKET))
        except BucketNotFoundError as e:
            raise ScheduleStoreError(f"KV bucket {SCHEDULES_BUCKET!r} does not exist: bootstrap first (`noetl-edge up` does it)") from e

    @staticmethod
    def _key(kind: str, tenant: str, project: str, schedule_id: str) -> str:
        return f"{kind}.{check_name('tenant', tenant)}.{check_name('project', project)}.{check_name('schedule id', schedule_id)}"

    async def _read(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # never written, or deleted/purged
            return None
        return entry.value or b"", entry.revision or 0

    async def create(self, schedule: Schedule) -> int:
        """Store a new schedule (its revision); :class:`ScheduleExists` when the id is taken."""
        key = self._key("def", schedule.tenant, schedule.project, schedule.id)
        try:
            revision = await self.kv.create(key, _encode.encode(schedule))
        except KeyWrongLastSequenceError:
            raise ScheduleExists(f"schedule {schedule.id!r} exists in {schedule.tenant}/{schedule.project}: "
                                 "delete it first, or pick another id") from None  # fmt: skip
        # A tick state left by an earlier schedule of this id would name its last run (overlap) as this one's.
        await self.kv.purge(self._key("tick", schedule.tenant, schedule.project, schedule.id))
        return revision

    async def get(self, tenant: str, project: str, schedule_id: str) -> tuple[Schedule, int] | None:
        """The schedule and its revision, or None."""
        key = self._key("def", tenant, project, schedule_id)
        found = await self._read(key)
        if found is None:
            return None
        try:
            return _schedule.decode(found[0]), found[1]
        except msgspec.DecodeError as e:
            raise ScheduleStoreError(f"the stored schedule {key} is unreadable: {e}") from e

    async def update(self, schedule: Schedule, revision: int) -> int:
        """Replace the schedule if it is still at ``revision``; :class:`ScheduleConflict` otherwise."""
        try:
            return await self.kv.update(self._key("def", schedule.tenant, schedule.project, schedule.id),
                                        _encode.encode(schedule), last=revision)  # fmt: skip
        except KeyWrongLastSequenceError:
            raise ScheduleConflict(f"schedule {schedule.id!r} changed meanwhile; nothing was written, try again") from None

    async def delete(self, tenant: str, project: str, schedule_id: str) -> bool:
        """Remove the schedule and its tick state; False when there was none."""
        if await self.get(tenant, project, schedule_id) is None:
            return False
        await self.kv.purge(self._key("def", tenant, project, schedule_id))
        await self.kv.purge(self._key("tick", tenant, project, schedule_id))
        return True

    async def list(self, tenant: str | None = None, project: str | None = None) -> list[Schedule]:
        """The schedules of one project (or of every one with None, None), sorted by tenant, project and id."""
        prefix = f"$KV.{SCHEDULES_BUCKET}."
        scope = f"{check_name('tenant', tenant)}.{check_name('project', project)}.*" if tenant and project else "*.*.*"
        keys = [s[len(prefix):] async for s in stream_subjects(self.js, f"KV_{SCHEDULES_BUCKET}", f"{prefix}def.{scope}")]
        found: list[Schedule] = []
        for key in sorted(keys):
            _, t, p, schedule_id = key.split(".", 3)
            got = await self.get(t, p, schedule_id)
            if got is not None:
                found.append(got[0])
        return found

    async def tick(self, schedule: Schedule) -> tuple[TickState | None, int]:
        """The schedule's tick state (None before its first tick) and the revision to write the next one against."""
        key = self._key("tick", schedule.tenant, schedule.project, schedule.id)
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError as e:
            # A purge marker is a revision too: the next write must come after it, not race a recreation.
            marker = getattr(e, "entry", None)
            return None, (marker.revision or 0) if marker is not None else 0
        try:
            return _tick.decode(entry.value or b""), entry.revision or 0
        except msgspec.DecodeError as e:
            raise ScheduleStoreError(f"the tick state {key} is unreadable: {e}") from e

    async def set_tick(self, schedule: Schedule, state: TickState, revision: int) -> int | None:
        """Write the tick state if it is still at ``revision`` (0: none yet); the new revision, or None if another
        writer got there first (nothing written)."""
        key = self._key("tick", schedule.tenant, schedule.project, schedule.id)
        try:
            return await self.kv.update(key, _encode.encode(state), last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def view(self, schedule: Schedule, *, now_ms: int) -> ScheduleView:
        """``schedule`` with its last handled tick, the execution of its last fired one, and its next tick."""
        state, _ = await self.tick(schedule)
        after = max(now_ms, schedule.not_before_ms, state.tick_ms if state else 0)
        upcoming = None if schedule.paused else next_tick(schedule, after)
        return ScheduleView(
            schedule=schedule, next_tick=None if upcoming is None else iso_ms(upcoming),
            last_tick=iso_ms(state.tick_ms) if state else None, last_execution_id=state.execution_id if state else None,
        )  # fmt: skip

    async def set_paused(self, tenant: str, project: str, schedule_id: str, *, paused: bool, now_ms: int) -> Schedule | None:
        """Pause or resume (None: no such schedule). A resume fires nothing due before ``now_ms``."""
        while True:
            found = await self.get(tenant, project, schedule_id)
            if found is None:
                return None
            schedule, revision = found
            if schedule.paused == paused:
                return schedule
            changed = msgspec.structs.replace(
                schedule, paused=paused, updated_at=iso_ms(now_ms),
                not_before_ms=schedule.not_before_ms if paused else max(now_ms, schedule.not_before_ms),
            )  # fmt: skip
            try:
                await self.update(changed, revision)
            except ScheduleConflict:
                continue  # changed meanwhile (a concurrent pause or resume): decide again on what is there now
            return changed


async def create_schedule(
    store: ScheduleStore, catalog: Catalog, spec: ScheduleSpec, *, tenant: str, project: str, now_ms: int
) -> Schedule:
    """Validate ``spec`` (:class:`~system_playbooks.schedules.spec.ScheduleInvalid`), check its playbook is
    registered (:class:`~system_playbooks.orchestrate.start.UnknownPlaybook`), then store it
    (:class:`ScheduleExists`); nothing is written unless every check passed."""
    schedule = check_spec(spec, tenant=tenant, project=project, now_ms=now_ms)
    await resolve_playbook(catalog, tenant, project, spec.playbook.path, spec.playbook.version)
    await store.create(schedule)
    return schedule
