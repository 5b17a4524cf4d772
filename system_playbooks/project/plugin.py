"""``system/project``: fold each batch into KV, one compare-and-set write per execution per batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kernel.host import ShardContext
from projector.cache import ProjectionCache
from projector.fold import WalEvent, fold
from projector.replay import entry_projection

CONCURRENCY = 32


class ProjectPlugin:
    """Keeps ``proj_<shard>`` equal to the fold of each execution's WAL history."""

    async def _one(self, ctx: ShardContext, cache: ProjectionCache, execution_id: str, events: list[WalEvent]) -> None:
        entry = await cache.get(execution_id)
        base = await entry_projection(entry, ctx.snapshots())
        if base is not None and events[-1].seq <= base.last_seq:
            return  # a redelivery of events already folded
        folded = fold(base, events)
        assert folded is not None
        await cache.put(execution_id, folded, revision=None if entry is None else entry.revision)

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> None:
        by_execution: dict[str, list[WalEvent]] = {}
        for event in events:
            by_execution.setdefault(event.env.execution_id, []).append(event)
        cache = ctx.cache(write=True)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def guarded(execution_id: str, evs: list[WalEvent]) -> None:
            async with gate:
                await self._one(ctx, cache, execution_id, evs)

        await asyncio.gather(*(guarded(x, evs) for x, evs in by_execution.items()))
