"""``system/materialize``: one Feather segment per batch of written projections, then pointers for finished ones.

It consumes the projection bucket's stream (``source: projections``), not the
WAL: it is delivered each projection as ``system/project`` stored it — the
latest revision of a key only, since the bucket keeps one — so it never waits
for ``system/project``, never reads the KV, and never sees an event the fold has
not taken. Its own pointer writes come back to it too, and write nothing.

Crash-safe by order: the segment is written first; a finished execution's KV
entry is swapped for a pointer only afterwards, with compare-and-set on the
revision it was delivered at, so a crash in between loses nothing and the
redelivered batch simply redoes it; a write that came later keeps the newer
projection inline, and a later batch takes it.

The I/O (the segment write, the pointers) is here; the pure core —
projections in, segment rows and pointer decisions out — is the row builder:
:func:`rows.build_rows` (Python), or with ``runtime: wasm`` in the manifest the
compiled ``wasm/rows.c`` (:class:`wasm_rows.WasmRows`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import structlog

from kernel.host import Manifest, ShardContext
from projector.cache import EntryUnreadable, Pointer, ProjectionWrite, SegmentPointer, is_pointer
from projector.compaction import Compactor, compaction_settings
from projector.errors import ProjectorError
from projector.fanout import fan_out
from projector.snapshots import SegmentRow, SnapshotStore
from system_playbooks.materialize.rows import RowError, build_rows, input_table

# Pointer writes in flight at once: one round trip per batch, not one per execution.
CONCURRENCY = 128
log = structlog.get_logger("noetl.materialize")


class MaterializePlugin:
    """Writes the projections a batch of bucket writes carries to a segment of its shard.

    ``rows`` overrides the row builder; otherwise ``manifest`` chooses it
    (``runtime: wasm`` → its ``module``, compiled on first use; else Python).
    """

    rows: Callable[[pa.Table], pa.Table] = staticmethod(build_rows)

    def __init__(self, manifest: Manifest | None = None, *, rows: Callable[[pa.Table], pa.Table] | None = None) -> None:
        if rows is None and manifest is not None and manifest.runtime == "wasm":
            # wasmtime is loaded only when a manifest asks for it
            from system_playbooks.materialize.wasm_rows import WasmRows

            rows = WasmRows(manifest.module)
        if rows is not None:
            self.rows = rows
        self.compact_segments, self.compact_grace_s = compaction_settings()
        self._written: dict[int, int] = {}  # shard -> segments written since the last compaction check

    def _projections(self, ctx: ShardContext, writes: Sequence[ProjectionWrite]) -> list[tuple[str, int, bytes]]:
        """``(execution id, revision, canonical projection)`` of each key's last write that is a projection."""
        latest: dict[str, ProjectionWrite] = {}
        for write in writes:
            latest[write.execution_id] = write  # a later write of a key supersedes the earlier (in stream order)
        out = []
        for key, write in sorted(latest.items()):
            try:
                if is_pointer(write.data):
                    continue  # already materialized and pointed at (often this plug-in's own write)
            except EntryUnreadable as e:
                ctx.log.warning("materialize.unreadable", execution_id=key, revision=write.revision, error=str(e))
                continue
            out.append((key, write.revision, write.data))
        return out

    async def _build(self, ctx: ShardContext, entries: list[tuple[str, int, bytes]]) -> list[dict[str, Any]]:
        try:
            built: list[dict[str, Any]] = (await asyncio.to_thread(self.rows, input_table(entries))).to_pylist()
            return built
        except (RowError, UnicodeDecodeError) as e:
            failed = e
        # The Python twin judges each entry alone, so that a row builder that fails by itself (a module that
        # does not build, a trapping guest) is never taken for bad entries: those are left out, the rest goes.
        good = []
        for entry in entries:
            try:
                build_rows(input_table([entry]))
            except (RowError, UnicodeDecodeError) as e:
                ctx.log.warning("materialize.unreadable", execution_id=entry[0], revision=entry[1], error=str(e))
            else:
                good.append(entry)
        if len(good) == len(entries):
            raise failed  # every entry is a projection: the row builder failed, and the batch is done again
        if not good:
            return []
        built = (await asyncio.to_thread(self.rows, input_table(good))).to_pylist()
        return built

    async def handle(self, ctx: ShardContext, writes: Sequence[ProjectionWrite]) -> None:
        entries = self._projections(ctx, writes)
        if not entries:
            return
        built = await self._build(ctx, entries)
        if not built:
            return
        rows = [SegmentRow(execution_id=r["execution_id"], tenant=r["tenant"], project=r["project"], status=r["status"],
                           last_seq=r["last_seq"], event_count=r["event_count"], projection=r["projection"])
                for r in built]  # fmt: skip
        store = ctx.snapshots(write=True)
        segment = await asyncio.to_thread(store.write_segment, ctx.shard, rows)
        cache = ctx.cache(write=True)

        async def point(index: int) -> None:
            r = built[index]
            pointer = Pointer(pointer=SegmentPointer(segment=segment, row=index), last_seq=r["last_seq"], status=r["status"])
            try:
                await cache.put_pointer(r["key"], pointer, revision=r["revision"])
            except ProjectorError:
                pass  # written again meanwhile: the newer projection stays inline, a later batch takes it

        await fan_out(point, [index for index, r in enumerate(built) if r["pointer"]], limit=CONCURRENCY)
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
