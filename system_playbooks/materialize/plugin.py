"""``system/materialize``: one Feather segment per batch of changed executions, then pointers for finished ones.

Crash-safe by order: the segment is written first; a finished execution's KV
entry is swapped for a pointer only afterwards, with compare-and-set, so a
crash in between loses nothing and the redelivered batch simply redoes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kernel.host import Retry, ShardContext
from projector.cache import CacheEntry, Pointer, ProjectionCache, SegmentPointer
from projector.errors import ProjectorError
from projector.fold import WalEvent
from projector.projection import TERMINAL, Projection, canonical
from projector.snapshots import SegmentRow

CATCH_UP_WAIT = 5.0


class MaterializePlugin:
    """Writes the projections a batch touched to a segment of its shard."""

    async def _caught_up(self, cache: ProjectionCache, want: dict[str, int]) -> dict[str, CacheEntry]:
        # The project plug-in folds the same events on its own consumer: wait (bounded) for it.
        deadline = asyncio.get_running_loop().time() + CATCH_UP_WAIT
        entries: dict[str, CacheEntry] = {}
        pending = dict(want)
        while True:
            for execution_id, seq in list(pending.items()):
                entry = await cache.get(execution_id)
                if entry is not None and entry.last_seq >= seq:
                    entries[execution_id] = entry
                    del pending[execution_id]
            if not pending:
                return entries
            if asyncio.get_running_loop().time() > deadline:
                raise Retry(f"{len(pending)} projection(s) not folded up to this batch yet", delay=2.0)
            await asyncio.sleep(0.05)

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> None:
        want: dict[str, int] = {}
        for event in events:
            want[event.env.execution_id] = event.seq
        cache = ctx.cache(write=True)
        entries = await self._caught_up(cache, want)
        rows: list[SegmentRow] = []
        inline: list[tuple[str, Projection, int]] = []
        for execution_id, entry in sorted(entries.items()):
            if entry.projection is None:
                continue  # already materialized and pointed at
            p = entry.projection
            rows.append(
                SegmentRow(
                    execution_id=p.execution_id,
                    tenant=p.tenant,
                    project=p.project,
                    status=p.status,
                    last_seq=p.last_seq,
                    event_count=p.event_count,
                    projection=canonical(p).decode(),
                )
            )
            inline.append((execution_id, p, entry.revision))
        if not rows:
            return
        segment = await asyncio.to_thread(ctx.snapshots(write=True).write_segment, ctx.shard, rows)
        for row, (execution_id, p, revision) in enumerate(inline):
            if p.status not in TERMINAL:
                continue
            pointer = Pointer(pointer=SegmentPointer(segment=segment, row=row), last_seq=p.last_seq, status=p.status)
            try:
                await cache.put_pointer(execution_id, pointer, revision=revision)
            except ProjectorError:
                pass  # folded further meanwhile: the newer projection stays inline, a later batch takes it
        ctx.log.info("segment.written", segment=segment, rows=len(rows))
