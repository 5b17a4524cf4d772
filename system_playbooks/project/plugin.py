"""``system/project``: fold each batch into KV, one compare-and-set write per execution per batch.

A projection larger than a KV value may be is stored by reference: a one-row
Feather segment (the format ``system/materialize`` writes) and a pointer to it
in KV. A write refused for a reason tied to one execution rejects that
execution's events (the pump dead-letters them); the rest of the batch is folded.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from kernel.host import Reject, ShardContext
from projector.cache import (
    CacheConflict,
    CacheEntry,
    EntryRefused,
    EntryTooLarge,
    EntryUnreadable,
    ProjectionCache,
    pointer_to,
)
from projector.fanout import fan_out
from projector.fold import WalEvent, fold
from projector.projection import Projection, canonical, decode_projection
from projector.replay import entry_projection
from projector.snapshots import SegmentRow
from projector.visibility import summarize

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
        try:
            return await self._latest(ctx, cache, execution_id, events)
        except (EntryRefused, EntryUnreadable) as e:
            # Tied to this execution alone: its events go to the DLQ with the reason, the shard goes on.
            reason = "projection_unreadable" if isinstance(e, EntryUnreadable) else "projection_refused"
            ctx.log.error("projection.isolated", execution_id=execution_id, reason=reason, error=str(e))
            return [Reject(event.seq, reason, str(e)) for event in events]

    async def _latest(
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
        if entry is None and (archived := ctx.archive_index()) is not None:
            # No KV entry: a new execution, or one system/cleanup archived (its entry went once its index row
            # was recorded): a late event is folded onto the archived projection, never onto a fresh one.
            row = await archived.get_row(execution_id)
            if row is not None and row.status:
                base = decode_projection(row.projection)
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
            # Nothing new: a redelivery of events already folded, after a batch failed (rare). If the entry
            # was written by a batch that failed before its check below, system/cleanup may have archived the
            # execution meanwhile: look again, so an entry outliving the archive goes now.
            if mine and entry is not None and base is not None:
                await self._archived_meanwhile(ctx, execution_id, base)
            return rejects
        folded = fold(base, mine)
        assert folded is not None
        visibility = ctx.visibility()
        if visibility is not None:
            # Before the projection: a batch redelivered after a crash between the two writes both again.
            await visibility.put(summarize(folded))
        revision = await self._write(ctx, cache, execution_id, folded, None if entry is None else entry.revision)
        if entry is None and await self._archived_meanwhile(ctx, execution_id, folded):
            return rejects
        remembered = self._remembered(ctx)
        remembered[execution_id] = CacheEntry(revision=revision, projection=folded)
        while len(remembered) > REMEMBERED:
            remembered.popitem(last=False)
        return rejects

    async def _archived_meanwhile(self, ctx: ShardContext, execution_id: str, folded: Projection) -> bool:
        """Whether system/cleanup archived the execution as far as ``folded`` (then its KV entry goes).

        Asked after a fold that read no KV entry and no index row created the entry (the archiver may have
        recorded the row and dropped the entry in between), and on a redelivery of events already folded
        (the batch that wrote the entry may have failed before asking): else the entry would outlive the
        archive for good.
        """
        archived = ctx.archive_index()
        if archived is None:
            return False
        row = await archived.get_row(execution_id, tenant=folded.tenant, project=folded.project)
        if row is None or row.last_seq < folded.last_seq:
            return False  # not archived, or this fold holds events past the archive (a late event re-opened it)
        dropped = await archived.drop_entry(execution_id, row.last_seq)
        ctx.log.info("projection.archived_meanwhile", execution_id=execution_id, dropped=dropped)
        return True

    async def _write(
        self, ctx: ShardContext, cache: ProjectionCache, execution_id: str, folded: Projection, revision: int | None
    ) -> int:
        try:
            return await cache.put(execution_id, folded, revision=revision)
        except EntryTooLarge as e:
            too_large = str(e)
        # By reference: the segment first, then the pointer (compare-and-set), so a crash in between
        # leaves the old entry and an unreferenced segment, and the redelivered batch does it again.
        row = SegmentRow(execution_id=folded.execution_id, tenant=folded.tenant, project=folded.project,
                         status=folded.status, last_seq=folded.last_seq, event_count=folded.event_count,
                         projection=canonical(folded).decode())  # fmt: skip
        segment = await asyncio.to_thread(ctx.snapshots(write=True).write_segment, ctx.shard, [row])
        revision = await cache.put_pointer(execution_id, pointer_to(segment, 0, folded), revision=revision)
        ctx.log.info("projection.by_reference", execution_id=execution_id, segment=segment, reason=too_large)
        return revision

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Reject]:
        by_execution: dict[str, list[WalEvent]] = {}
        for event in events:
            by_execution.setdefault(event.env.execution_id, []).append(event)
        cache = ctx.cache(write=True)

        async def one(item: tuple[str, list[WalEvent]]) -> list[Reject]:
            return await self._one(ctx, cache, *item)

        results = await fan_out(one, by_execution.items(), limit=CONCURRENCY)
        return [r for rejects in results for r in rejects]
