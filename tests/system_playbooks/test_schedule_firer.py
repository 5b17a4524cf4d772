"""The kernel's schedule firer against a real nats-server, with the time given to each look: each tick
starts one execution however many firers look, pause/resume/delete, overlap skip, catch-up, held shards."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext

from kernel.producer import Producer
from system_playbooks.schedules.firer import ScheduleFirer
from locator.envelope import decode_envelope, new_event
from locator.shard import shard_for
from locator.subjects import wal_stream
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.fold import fold
from projector.replay import history
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.playbook import Policy
from system_playbooks.schedules.spec import ScheduleSpec, check_spec
from system_playbooks.schedules.store import ScheduleStore
from system_playbooks.schedules.ticks import tick_execution_id
from tests.conftest import subject_messages

TENANT, PROJECT = "acme", "sched"
PLAYBOOK = "path: sched/noop\nversion: 1\nsteps: [{name: a, tool: {kind: noop}}]"
# A past instant on a 2 s boundary: every look is given its time, so nothing here waits for the clock.
T0 = (time.time_ns() // 1_000_000 - 3_600_000) // 2000 * 2000


async def setup(js: JetStreamContext, **fields: Any) -> ScheduleStore:
    await (await Catalog.open(js)).register(TENANT, PROJECT, PLAYBOOK, policy=Policy())
    spec = msgspec.convert({"id": "s", "playbook": {"path": "sched/noop"}, "every": "2s", **fields}, ScheduleSpec)
    store = await ScheduleStore.open(js)
    await store.create(check_spec(spec, tenant=TENANT, project=PROJECT, now_ms=T0))
    return store


def firer(js: JetStreamContext, topology: Topology, held: tuple[int, ...] = (0, 1, 2, 3)) -> ScheduleFirer:
    return ScheduleFirer(js, topology=topology, held=lambda: held)


async def requested(js: JetStreamContext, topology: Topology) -> list[tuple[int, str]]:
    """(seconds after T0, execution id) of every stored execution.requested of the project, in WAL order."""
    shard = shard_for(TENANT, PROJECT, "", topology.shard_count)
    out: list[tuple[int, str]] = []
    async for _, data in subject_messages(js, wal_stream(shard), f"wal.{shard}.{TENANT}.{PROJECT}.*.execution.requested"):
        env = decode_envelope(data)
        ms = int(datetime.fromisoformat(env.payload["schedule"]["tick"]).timestamp() * 1000)
        out.append(((ms - T0) // 1000, env.execution_id))
    return out


async def test_each_tick_starts_one_execution_however_many_firers_look(js: JetStreamContext, topology: Topology) -> None:
    store = await setup(js, overlap="allow")
    a, b = firer(js, topology), firer(js, topology)
    for now in (T0 + 2000, T0 + 2000, T0 + 7000, T0 + 9999):
        await asyncio.gather(a.look(store, now_ms=now), b.look(store, now_ms=now), a.look(store, now_ms=now))
    fired = await requested(js, topology)
    schedule = (await store.get(TENANT, PROJECT, "s"))
    assert schedule is not None
    assert fired == [(t, tick_execution_id(schedule[0], T0 + t * 1000)) for t in (2, 4, 6, 8)]
    view = await store.view(schedule[0], now_ms=T0 + 9999)
    assert view.last_execution_id == fired[-1][1] and view.next_tick is not None


async def test_only_a_holder_of_the_shard_fires(js: JetStreamContext, topology: Topology) -> None:
    store = await setup(js, overlap="allow")
    mine = shard_for(TENANT, PROJECT, "", topology.shard_count)
    await firer(js, topology, held=tuple(s for s in range(4) if s != mine)).look(store, now_ms=T0 + 4000)
    assert await requested(js, topology) == []
    await firer(js, topology, held=(mine,)).look(store, now_ms=T0 + 4000)
    assert [t for t, _ in await requested(js, topology)] == [2, 4]


async def test_pause_resume_delete(js: JetStreamContext, topology: Topology) -> None:
    store = await setup(js, overlap="allow")
    f = firer(js, topology)
    await f.look(store, now_ms=T0 + 2000)
    await store.set_paused(TENANT, PROJECT, "s", paused=True, now_ms=T0 + 3000)
    await f.look(store, now_ms=T0 + 10_000)
    assert [t for t, _ in await requested(js, topology)] == [2]
    # Resumed at +11 s: the ticks of the pause (4..10) are not caught up, the next ones fire.
    await store.set_paused(TENANT, PROJECT, "s", paused=False, now_ms=T0 + 11_000)
    await f.look(store, now_ms=T0 + 14_000)
    assert [t for t, _ in await requested(js, topology)] == [2, 12, 14]
    assert await store.delete(TENANT, PROJECT, "s")
    await f.look(store, now_ms=T0 + 20_000)
    assert [t for t, _ in await requested(js, topology)] == [2, 12, 14]


async def end(js: JetStreamContext, topology: Topology, execution_id: str) -> None:
    """Complete the execution and fold its WAL into the projection cache, as the kernel's project plug-in does."""
    await Producer(js, topology).publish(new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type="execution.completed"))
    shard = shard_for(TENANT, PROJECT, "", topology.shard_count)
    events = [e async for e in history(js, shard=shard, shard_count=topology.shard_count, tenant=TENANT, project=PROJECT,
                                       execution_id=execution_id)]  # fmt: skip
    projection = fold(None, events)
    assert projection is not None and projection.status == "COMPLETED"
    cache = await KvProjectionCache.open(js, shard)
    entry = await cache.get(execution_id)
    await cache.put(execution_id, projection, revision=entry.revision if entry else None)


async def test_overlap_skip_waits_for_the_previous_run_and_allow_does_not(js: JetStreamContext, topology: Topology) -> None:
    store = await setup(js)  # overlap: skip
    f = firer(js, topology)
    await f.look(store, now_ms=T0 + 2000)
    await f.look(store, now_ms=T0 + 4000)  # the +2 s run has not ended (its projection is not even folded): skip
    await f.look(store, now_ms=T0 + 6000)
    first = await requested(js, topology)
    assert [t for t, _ in first] == [2]
    await end(js, topology, first[0][1])
    await f.look(store, now_ms=T0 + 8000)
    assert [t for t, _ in await requested(js, topology)] == [2, 8]

    found = await store.get(TENANT, PROJECT, "s")
    assert found is not None
    await store.update(msgspec.structs.replace(found[0], overlap="allow"), found[1])
    await f.look(store, now_ms=T0 + 12_000)  # the +8 s run still runs: allow fires anyway
    assert [t for t, _ in await requested(js, topology)] == [2, 8, 10, 12]


async def test_catchup_last_fires_the_newest_missed_tick_once_and_none_skips(js: JetStreamContext, topology: Topology) -> None:
    store = await setup(js, overlap="allow", grace_s=3, catchup="last")
    f = firer(js, topology)
    await f.look(store, now_ms=T0 + 2000)
    await f.look(store, now_ms=T0 + 30_000)  # down for 28 s: 4..26 were missed, 28 and 30 are within the grace
    assert [t for t, _ in await requested(js, topology)] == [2, 26, 28, 30]

    found = await store.get(TENANT, PROJECT, "s")
    assert found is not None
    await store.update(msgspec.structs.replace(found[0], catchup="none"), found[1])
    await f.look(store, now_ms=T0 + 60_000)  # 32..56 missed and skipped
    assert [t for t, _ in await requested(js, topology)] == [2, 26, 28, 30, 58, 60]
