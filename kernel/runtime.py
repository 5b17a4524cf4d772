"""One kernel process: hold shard leases, run a pump per (held shard, system plug-in)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS

from kernel.bootstrap import StreamSettings, check_topology
from kernel.host import Manifest, Plugin, context_for, load_plugin, system_manifests
from kernel.leases import ShardLeases
from kernel.pump import Pump, PumpStats
from kernel.scheduler import Scheduler
from system_playbooks.schedules.firer import ScheduleFirer
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.snapshots import SnapshotStore

log = structlog.get_logger("noetl.kernel.runtime")


@dataclass
class _Running:
    pump: Pump
    stop: asyncio.Event
    task: asyncio.Task[None]


def default_holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}".lower().replace(".", "-")


class Kernel:
    """Folds the shards it holds a lease on; several kernels share a cell's shards between them.

    >>> # kernel = Kernel(nc, topology=topology, snapshots=SnapshotStore("file:///tmp/objects"))
    >>> # await kernel.run(stop_event)
    """

    def __init__(
        self,
        nc: NATS,
        *,
        topology: Topology,
        snapshots: SnapshotStore,
        settings: StreamSettings | None = None,
        cell: str | None = None,
        holder: str | None = None,
        manifests: Sequence[Manifest] | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.topology = topology
        self.snapshots = snapshots
        self.settings = settings or StreamSettings()
        self.cell = topology.cell(cell) if cell else topology.cells[0]
        self.holder = holder or default_holder()
        self.manifests = list(manifests) if manifests is not None else system_manifests()
        # All the system plug-ins lease `shard.<n>`; a kernel running only some of them leases in a group
        # of its own, so e.g. an orchestrate-only kernel and a fold-only kernel both hold every shard.
        every = {m.consumer for m in system_manifests()}
        mine = {m.consumer for m in self.manifests}
        self.lease_group = "" if mine == every else "-".join(sorted(mine))
        if len(topology.cells) > 1:
            # The leases bucket is global: without the cell, kernels of every cell would count as members
            # sharing this cell's shards, and each would hold only its share of a share.
            self.lease_group = "-".join(g for g in (self.cell.name, self.lease_group) if g)
        self.plugins: dict[str, Plugin] = {m.path: load_plugin(m) for m in self.manifests}
        self.running: dict[tuple[int, str], _Running] = {}
        self.timers: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self.log = log.bind(holder=self.holder, cell=self.cell.name)

    @property
    def shards(self) -> list[int]:
        """The shards this kernel folds right now."""
        return sorted({shard for shard, _ in self.running})

    def stats(self) -> list[PumpStats]:
        return [r.pump.stats for r in self.running.values()]

    async def _start_shard(self, shard: int, revision: int) -> None:
        cache = await KvProjectionCache.open(self.js, shard)
        for manifest in self.manifests:
            pump = Pump(
                self.js,
                shard=shard,
                shard_count=self.topology.shard_count,
                plugin=self.plugins[manifest.path],
                ctx=context_for(
                    manifest, shard, cache=cache, snapshots=self.snapshots, js=self.js, topology=self.topology,
                    duplicate_window_s=self.settings.duplicate_window_s,
                ),
                consumer=manifest.consumer,
                max_batch=manifest.max_batch,
                linger=manifest.linger_s,
                types=manifest.types,
                source=manifest.source,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(pump.run(stop), name=f"pump-{manifest.consumer}-{shard}")
            self.running[(shard, manifest.path)] = _Running(pump, stop, task)
        stop = asyncio.Event()
        scheduler = Scheduler(self.js, shard=shard)
        self.timers[shard] = (stop, asyncio.create_task(scheduler.run(stop), name=f"scheduler-{shard}"))
        self.log.info("shard.acquired", shard=shard, revision=revision)

    async def _stop_shard(self, shard: int) -> None:
        # Losing a lease stops folding at once; the revision checks fence any write already in flight.
        stopped = [self.running.pop(key) for key in list(self.running) if key[0] == shard]
        tasks = [r.task for r in stopped]
        for r in stopped:
            r.stop.set()
            r.task.cancel()
        if shard in self.timers:
            stop, task = self.timers.pop(shard)
            stop.set()
            task.cancel()
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.log.info("shard.released", shard=shard)

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[], None] | None = None) -> None:
        """Fold leased shards until ``stop``; ``on_ready`` runs once the topology checked out."""
        await check_topology(self.js, self.topology, shard=self.cell.shards[0])
        leases = ShardLeases(
            self.js,
            holder=self.holder,
            shards=self.cell.shards,
            ttl=self.settings.lease_ttl_s,
            on_acquired=self._start_shard,
            on_lost=self._stop_shard,
            group=self.lease_group,
        )
        self.log.info("kernel.started", shards=list(self.cell.shards), plugins=list(self.plugins))
        if on_ready:
            on_ready()
        # Schedules start executions, so the kernels that orchestrate fire them, each on the shards it holds.
        firing = asyncio.Event()
        firer = None
        if "system/orchestrate" in self.plugins:
            firer = asyncio.create_task(
                ScheduleFirer(self.js, topology=self.topology, held=lambda: self.shards).run(firing), name="schedules"
            )
        try:
            await leases.run(stop)
        finally:
            firing.set()
            if firer is not None:
                await asyncio.gather(firer, return_exceptions=True)
            for shard in self.shards:
                await self._stop_shard(shard)
            self.log.info("kernel.stopped")
