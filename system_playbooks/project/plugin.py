"""``system/project``: fold each batch into KV, one compare-and-set write per execution per batch."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from kernel.host import Reject, ShardContext
from projector.cache import CacheConflict, CacheEntry, ProjectionCache
from projector.fold import WalEvent, fold
from projector.replay import entry_projection

CONCURRENCY = 32
REMEMBERED = 2000  # per shard: the entries this plug-in wrote last, so the next batch skips reading them


class ProjectPlugin:
    """Keeps ``proj_<shard>`` equal to the fold of each execution's WAL history.

    It remembers the entries it wrote (with their KV revisions): an execution
    whose events keep coming is folded onto the remembered entry without a KV
    read. The write is still fenced by the revision, so a remembered entry
    that went stale (materialize swapped in a pointer, another kernel wrote)
    fails to write, is forgotten and the batch is folded again from KV.
    """

    def __init__(self) -> None:
        self._shards: dict[int, tuple[ShardContext, OrderedDict[str, CacheEntry]]] = {}

    def _remembered(self, ctx: ShardContext) -> OrderedDict[str, CacheEntry]:
        held = self._shards.get(ctx.shard)
        if held is None or held[0] is not ctx:
            held = self._shards[ctx.shard] = (ctx, OrderedDict())  # a new lease: remember nothing old
        return held[1]

    async def _one(
        self, ctx: ShardContext, cache: ProjectionCache, execution_id: str, events: list[WalEvent]
    ) -> list[Reject]:
        remembered = self._remembered(ctx)
        entry = remembered.pop(execution_id, None)
        if entry is not None:
            try:
                return await self._fold(ctx, cache, execution_id, events, entry)
            except CacheConflict:
                pass  # stale: fold again from what KV holds now
        return await self._fold(ctx, cache, execution_id, events, await cache.get(execution_id))

    async def _fold(
        self, ctx: ShardContext, cache: ProjectionCache, execution_id: str, events: list[WalEvent],
        entry: CacheEntry | None,
    ) -> list[Reject]:
        base = await entry_projection(entry, ctx.snapshots())
        owner = (base.tenant, base.project) if base else (events[0].env.tenant, events[0].env.project)
        # The cache is keyed by execution id alone: an id reused by another tenant/project on this shard
        # cannot be folded here, and must not block the shard either.
        rejects = [
            Reject(e.seq, "execution_id_conflict", f"execution {execution_id} belongs to {owner[0]}/{owner[1]}")
            for e in events
            if (e.env.tenant, e.env.project) != owner
        ]
        mine = [e for e in events if (e.env.tenant, e.env.project) == owner]
        if not mine or (base is not None and mine[-1].seq <= base.last_seq):
            return rejects  # nothing new: a redelivery of events already folded
        folded = fold(base, mine)
        assert folded is not None
        revision = await cache.put(execution_id, folded, revision=None if entry is None else entry.revision)
        remembered = self._remembered(ctx)
        remembered[execution_id] = CacheEntry(revision=revision, projection=folded)
        while len(remembered) > REMEMBERED:
            remembered.popitem(last=False)
        return rejects

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Reject]:
        by_execution: dict[str, list[WalEvent]] = {}
        for event in events:
            by_execution.setdefault(event.env.execution_id, []).append(event)
        cache = ctx.cache(write=True)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def guarded(execution_id: str, evs: list[WalEvent]) -> list[Reject]:
            async with gate:
                return await self._one(ctx, cache, execution_id, evs)

        results = await asyncio.gather(*(guarded(x, evs) for x, evs in by_execution.items()))
        return [r for rejects in results for r in rejects]
