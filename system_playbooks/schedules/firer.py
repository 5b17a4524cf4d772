"""The schedule firer: starts the executions of schedules (KV ``schedules``) on the shards a kernel holds.

When a schedule fires and what it skips is decided by :mod:`.ticks`; this loop reads the schedules, asks
whether the last tick's execution still runs (its projection, else the WAL), publishes a tick's
``execution.requested`` and records the tick, compare-and-set. The kernel runtime runs one per orchestrating
kernel (``kernel/runtime.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kernel.errors import PublishError
from kernel.producer import Producer
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.errors import ProjectorError
from projector.projection import TERMINAL
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.start import UnknownPlaybook, requested_event, resolve_playbook
from system_playbooks.schedules.spec import Schedule, iso_ms
from system_playbooks.schedules.store import ScheduleStore, ScheduleStoreError, TickState
from system_playbooks.schedules.ticks import due, fires, tick_event_id, tick_execution_id

log = structlog.get_logger("noetl.kernel.scheduler")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ScheduleFirer:
    """Fires the schedules of the shards this kernel holds (KV ``schedules``), each due tick once.

    Every ``poll_s`` it lists the schedules, keeps those whose tenant/project/affinity falls on a shard
    in ``held()`` (the kernel's leases), and hands each due tick (``system_playbooks.schedules.ticks.due``)
    to :meth:`_handle`: start it or skip it, then record it as the schedule's last tick, compare-and-set.
    A tick's execution id and ``Nats-Msg-Id`` come from the schedule and the tick, so a tick started twice
    (two holders during a lease move, a crash before the record) is one execution.

    >>> # firer = ScheduleFirer(js, topology=topology, held=lambda: {0, 1})
    >>> # await firer.run(stop)
    """

    def __init__(
        self, js: JetStreamContext, *, topology: Topology, held: Callable[[], Collection[int]], poll_s: float = 0.5,
    ) -> None:
        self.js = js
        self.topology = topology
        self.held = held
        self.poll_s = poll_s
        self.started = 0
        self.producer = Producer(js, topology)
        self.log = log.bind(part="schedules")

    def _shard(self, s: Schedule) -> int:
        return shard_for(s.tenant, s.project, s.affinity, self.topology.shard_count)

    async def _running(self, s: Schedule, state: TickState | None) -> bool:
        """Whether the execution of the schedule's last fired tick is still going (its projection says)."""
        if state is None or state.execution_id is None:
            return False
        shard = self._shard(s)
        entry = await (await KvProjectionCache.open(self.js, shard)).get(state.execution_id)
        if entry is not None:
            status = entry.projection.status if entry.projection is not None else entry.pointer.status if entry.pointer else ""
            return status not in TERMINAL
        try:  # not folded yet (it is in the WAL), or ended and archived (it is not)
            await self.js.get_msg(wal_stream(shard), seq=1, next=True,
                                  subject=execution_filter(shard, s.tenant, s.project, state.execution_id))  # fmt: skip
        except NotFoundError:
            return False
        return True

    async def _start(self, s: Schedule, tick_ms: int) -> str | None:
        """Publish the tick's ``execution.requested`` as the start route does; its execution id (None: no playbook)."""
        try:
            playbook = await resolve_playbook(await self._catalog(), s.tenant, s.project, s.playbook.path, s.playbook.version)
        except UnknownPlaybook as e:
            self.log.error("schedule.unknown_playbook", schedule=s.key, tick=iso_ms(tick_ms), error=str(e))
            return None
        execution_id = tick_execution_id(s, tick_ms)
        env = requested_event(
            tenant=s.tenant, project=s.project, affinity=s.affinity, execution_id=execution_id, playbook=playbook,
            workload=s.workload, event_id=tick_event_id(execution_id), extra={"schedule": {"id": s.id, "tick": iso_ms(tick_ms)}},
        )
        ack = await self.producer.publish(env)
        self.started += not ack.duplicate
        self.log.info("schedule.fired", schedule=s.key, tick=iso_ms(tick_ms), execution_id=execution_id, duplicate=ack.duplicate)
        return execution_id

    async def _catalog(self) -> Catalog:
        return await Catalog.open(self.js)

    async def _handle(self, store: ScheduleStore, s: Schedule, now_ms: int) -> None:
        state, revision = await store.tick(s)
        for tick in due(s, last_tick_ms=state.tick_ms if state else None, now_ms=now_ms):
            if self._shard(s) not in self.held():
                return  # the lease moved mid-way: the new holder goes on from the last recorded tick
            execution_id = state.execution_id if state else None
            fired_ms = state.fired_ms if state else None
            if not tick.fire:
                self.log.info("schedule.missed", schedule=s.key, tick=iso_ms(tick.ms), catchup=s.catchup)
            elif not fires(s, previous_running=await self._running(s, state)):
                self.log.info("schedule.overlap_skipped", schedule=s.key, tick=iso_ms(tick.ms), running=execution_id)
            else:
                started = await self._start(s, tick.ms)
                if started is not None:
                    execution_id, fired_ms = started, tick.ms
            new = TickState(tick_ms=tick.ms, execution_id=execution_id, fired_ms=fired_ms)
            written = await store.set_tick(s, new, revision)
            if written is None:
                return  # another holder recorded this tick (same ids: its start and ours are one execution)
            state, revision = new, written

    async def look(self, store: ScheduleStore, now_ms: int | None = None) -> None:
        """Handle every due tick of the held shards' schedules once."""
        held = set(self.held())
        for s in await store.list():
            if not s.paused and self._shard(s) in held:
                try:
                    await self._handle(store, s, _now_ms() if now_ms is None else now_ms)
                except (ScheduleStoreError, ProjectorError, PublishError) as e:
                    self.log.warning("schedule.failed", schedule=s.key, error=str(e))

    async def run(self, stop: asyncio.Event) -> None:
        store: ScheduleStore | None = None
        last_error = ""
        while not stop.is_set():
            try:
                store = store or await ScheduleStore.open(self.js)
                await self.look(store)
                last_error = ""
            except (ScheduleStoreError, nats.errors.Error, asyncio.TimeoutError, ConnectionError) as e:
                if repr(e) != last_error:  # once per outage, not every look
                    self.log.warning("schedules.nats_error", error=repr(e))
                last_error = repr(e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
