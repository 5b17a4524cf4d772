"""``system/materialize``: one Feather segment per batch of changed executions, then pointers for finished ones.

Crash-safe by order: the segment is written first; a finished execution's KV
entry is swapped for a pointer only afterwards, with compare-and-set, so a
crash in between loses nothing and the redelivered batch simply redoes it.

The I/O (KV reads, the segment write, the pointers) is here; the pure core —
projections in, segment rows and pointer decisions out — is the row builder:
:func:`rows.build_rows` (Python), or with ``runtime: wasm`` in the manifest the
compiled ``wasm/rows.c`` (:class:`wasm_rows.WasmRows`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pyarrow as pa
import structlog

from kernel.host import Manifest, Retry, ShardContext
from projector.cache import CacheEntry, EntryUnreadable, Pointer, ProjectionCache, SegmentPointer
from projector.compaction import Compactor, compaction_settings
from projector.errors import ProjectorError
from projector.fanout import fan_out
from projector.fold import WalEvent
from projector.projection import canonical
from projector.snapshots import SegmentRow, SnapshotStore
from system_playbooks.materialize.rows import build_rows, input_table

CATCH_UP_WAIT = 5.0
CATCH_UP_TRIES = 5  # batches retried this often (about 35 s) go on without the projections still behind
# KV reads and pointer writes in flight at once: one round trip per batch, not one per execution.
CONCURRENCY = 128
log = structlog.get_logger("noetl.materialize")

T = TypeVar("T")
R = TypeVar("R")


async def _gather(call: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R | EntryUnreadable]:
    """``call`` on every item, at most :data:`CONCURRENCY` at a time, results in order.

    An :class:`EntryUnreadable` is returned in its item's place (it concerns that one execution);
    any other error is raised, and the batch is redone.
    """

    async def one(item: T) -> R | EntryUnreadable:
        try:
            return await call(item)
        except EntryUnreadable as e:
            return e

    return await fan_out(one, items, limit=CONCURRENCY)


class MaterializePlugin:
    """Writes the projections a batch touched to a segment of its shard.

    ``rows`` overrides the row builder; otherwise ``manifest`` chooses it
    (``runtime: wasm`` → its ``module``, compiled on first use; else Python).
    """

    rows: Callable[[pa.Table], pa.Table] = staticmethod(build_rows)

    def __init__(
        self, manifest: Manifest | None = None, *, rows: Callable[[pa.Table], pa.Table] | None = None,
        catch_up_wait: float = CATCH_UP_WAIT, catch_up_tries: int = CATCH_UP_TRIES,
    ) -> None:
        self.catch_up_wait = catch_up_wait
        self.catch_up_tries = catch_up_tries
        if rows is None and manifest is not None and manifest.runtime == "wasm":
            # wasmtime is loaded only when a manifest asks for it
            from system_playbooks.materialize.wasm_rows import WasmRows

            rows = WasmRows(manifest.module)
        if rows is not None:
            self.rows = rows
        self.compact_segments, self.compact_grace_s = compaction_settings()
        self._waits: dict[int, int] = {}  # first seq of a batch -> how often it waited for system/project
        self._written: dict[int, int] = {}  # shard -> segments written since the last compaction check

    async def _caught_up(self, cache: ProjectionCache, want: dict[str, int], first_seq: int) -> dict[str, CacheEntry]:
        # The project plug-in folds the same events on its own consumer: wait (bounded) for it.
        deadline = asyncio.get_running_loop().time() + self.catch_up_wait
        entries: dict[str, CacheEntry] = {}
        pending = dict(want)
        while True:
            for execution_id, got in zip(list(pending), await _gather(cache.get, list(pending)), strict=True):
                if isinstance(got, EntryUnreadable):
                    del pending[execution_id]  # system/project rejects its events: there is nothing to wait for
                elif got is not None and got.last_seq >= pending[execution_id]:
                    entries[execution_id] = got
                    del pending[execution_id]
            if not pending:
                return entries
            if asyncio.get_running_loop().time() > deadline:
                if self._waits.get(first_seq, 0) >= self.catch_up_tries:
                    # Waited long enough: system/project rejected these events (dead-lettered) or is stuck on
                    # them, and the shard must not stall behind it. Their rows come with a later batch, if any.
                    log.warning("materialize.skipped", executions=sorted(pending), first_seq=first_seq)
                    self._waits.pop(first_seq, None)
                    return entries
                self._waits[first_seq] = self._waits.get(first_seq, 0) + 1
                while len(self._waits) > 64:
                    self._waits.pop(next(iter(self._waits)))
                raise Retry(f"{len(pending)} projection(s) not folded up to this batch yet", delay=2.0)
            await asyncio.sleep(0.05)

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> None:
        want: dict[str, int] = {}
        for event in events:
            want[event.env.execution_id] = event.seq
        cache = ctx.cache(write=True)
        entries = await self._caught_up(cache, want, events[0].seq)
        ordered = sorted(entries.items())
        table = input_table(
            (execution_id, entry.revision, None if entry.projection is None else canonical(entry.projection))
            for execution_id, entry in ordered
        )  # an entry without a projection is already materialized and pointed at: no row
        built = (await asyncio.to_thread(self.rows, table)).to_pylist()
        if not built:
            return
        rows = [SegmentRow(execution_id=r["execution_id"], tenant=r["tenant"], project=r["project"], status=r["status"],
                           last_seq=r["last_seq"], event_count=r["event_count"], projection=r["projection"])
                for r in built]  # fmt: skip
        store = ctx.snapshots(write=True)
        segment = await asyncio.to_thread(store.write_segment, ctx.shard, rows)

        async def point(index: int) -> None:
            r = built[index]
            pointer = Pointer(pointer=SegmentPointer(segment=segment, row=index), last_seq=r["last_seq"], status=r["status"])
            try:
                await cache.put_pointer(r["key"], pointer, revision=r["revision"])
            except ProjectorError:
                pass  # folded further meanwhile: the newer projection stays inline, a later batch takes it

        await _gather(point, [index for index, r in enumerate(built) if r["pointer"]])
        ctx.log.info("segment.written", segment=segment, rows=len(rows))
        # Listing the shard's segments and reading its manifest on every batch would be I/O on the hot path
        # (a LIST and a GET per batch on S3): look only once this plug-in has written enough segments to matter.
        self._written[ctx.shard] = self._written.get(ctx.shard, 0) + 1
        if self._written[ctx.shard] < self.compact_segments:
            return
        self._written[ctx.shard] = 0
        report = await self.compactor(store).compact(ctx.shard, cache, archive=ctx.archive_index())
        if report is not None:
            ctx.log.info("segments.compacted", segment=report.segment, inputs=report.inputs, rows=report.rows,
                         pointers_moved=report.pointers_moved, deleted=report.deleted,
                         archived_dropped=report.archived_dropped)  # fmt: skip

    def compactor(self, store: SnapshotStore) -> Compactor:
        return Compactor(store, min_segments=self.compact_segments, grace_s=self.compact_grace_s)
