"""One NATS connection per cell; a cell that is down answers 503 for its shards only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from edge.errors import Unavailable
from kernel.connect import close, connect
from kernel.errors import KernelError
from locator.topology import Cell, Topology
from projector.cache import KvProjectionCache
from projector.mirror import MirrorSettings, ProjectionMirror
from system_playbooks.orchestrate.latest import LatestVersions

log = structlog.get_logger("noetl.edge.cells")
RETRY_AFTER = "5"


T = TypeVar("T")


class CellClients:
    """Lazily (re)connected clients per cell, plus the per-shard projection caches on them."""

    def __init__(
        self, topology: Topology, *, connect_timeout: float = 2.0, retry_every: float = 1.0,
        mirror: MirrorSettings = MirrorSettings(),
    ) -> None:
        self.topology = topology
        self.mirror = mirror
        self.connect_timeout = connect_timeout
        self.retry_every = retry_every
        self._nc: dict[str, NATS] = {}
        self._failed_at: dict[str, float] = {}
        self._held: dict[tuple[int, str], tuple[NATS, Any]] = {}
        # One lock per cell: a hung connect to one cell must not stall requests for the others.
        self._locks: dict[str, asyncio.Lock] = {}

    async def _connect(self, cell: Cell) -> NATS:
        nc = self._nc.get(cell.name)
        if nc is not None and not nc.is_closed:
            return nc  # the common case takes no lock at all
        async with self._locks.setdefault(cell.name, asyncio.Lock()):
            nc = self._nc.get(cell.name)
            if nc is not None and not nc.is_closed:
                return nc
            if time.monotonic() - self._failed_at.get(cell.name, -1e9) < self.retry_every:
                raise Unavailable(f"cell {cell.name!r} is unreachable", headers={"Retry-After": RETRY_AFTER})
            try:
                nc = await connect(
                    list(cell.urls), name="noetl-edge", connect_timeout=self.connect_timeout, initial_attempts=1
                )
            except KernelError as e:
                self._failed_at[cell.name] = time.monotonic()
                log.warning("cell.unreachable", cell=cell.name, error=str(e))
                raise Unavailable(f"cell {cell.name!r} is unreachable", headers={"Retry-After": RETRY_AFTER}) from e
            self._nc[cell.name] = nc
            return nc

    async def nats_for_shard(self, shard: int) -> NATS:
        cell = self.topology.cell_for_shard(shard)
        nc = await self._connect(cell)
        if not nc.is_connected:
            raise Unavailable(
                f"cell {cell.name!r} (shard {shard}) is reconnecting to NATS", headers={"Retry-After": RETRY_AFTER}
            )
        return nc

    async def js_for_shard(self, shard: int) -> JetStreamContext:
        return (await self.nats_for_shard(shard)).jetstream()

    async def held(
        self, shard: int, name: str, open_: Callable[[JetStreamContext], Awaitable[T]], *, keep: Callable[[T], bool] = lambda _: True
    ) -> T:
        """``open_(js)`` on the shard's connection, kept while that connection lives (unless ``keep`` says not).

        Opening a KV bucket costs a request and a stream-info answer to parse; a route that opened its buckets
        on every request paid that each time.
        """
        nc = await self.nats_for_shard(shard)
        got = self._held.get((shard, name))
        if got is not None and got[0] is nc:
            return cast(T, got[1])
        value = await open_(nc.jetstream())
        if keep(value):
            self._held[(shard, name)] = (nc, value)
        return value

    async def cache_for_shard(self, shard: int) -> KvProjectionCache:
        return await self.held(shard, "proj", lambda js: KvProjectionCache.open(js, shard))

    async def mirror_for_shard(self, shard: int) -> ProjectionMirror | None:
        """The shard's warm entries in memory (:mod:`projector.mirror`); None when the mirror is off."""
        if not self.mirror.enabled:
            return None
        cache = await self.cache_for_shard(shard)
        share = self.mirror.max_bytes // self.topology.shard_count
        return await self.held(
            shard, "mirror",
            lambda js: ProjectionMirror.open(js, shard, cache, max_bytes=share, max_age=self.mirror.max_age),
        )  # fmt: skip

    def connected(self) -> dict[str, bool]:
        return {c.name: bool(self._nc.get(c.name) and self._nc[c.name].is_connected) for c in self.topology.cells}

    async def start(self) -> None:
        """Try every cell once; a cell that is down is retried on demand."""
        for cell in self.topology.cells:
            try:
                await self._connect(cell)
            except Unavailable:
                pass

    async def close(self) -> None:
        for _, value in self._held.values():
            if isinstance(value, (ProjectionMirror, LatestVersions)):  # each follows a bucket: stop its consumer
                await value.close()
        for nc in self._nc.values():
            await close(nc)
        self._nc.clear()
        self._held.clear()
