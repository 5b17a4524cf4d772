"""Compaction of projection segments: many small Feather segments become one, sorted and indexed.

``system/materialize`` writes one segment per batch, so a shard's segments
grow with every batch. :class:`Compactor` merges them: it keeps only the
newest row of each execution (the highest ``last_seq``), writes the rows
sorted by execution id (snowflake ids are time-ordered) with each record
batch's id range in the schema metadata, moves the KV pointers that pointed
into the merged segments onto the new one (compare-and-set), and records in
the shard's manifest (``segments/shard=<n>/manifest.json``) which segments
are compacted, with their id ranges, and which are superseded and when.
Superseded segments are deleted once ``grace_s`` has passed, so a reader that
read an old pointer just before it moved still finds its file.

Crash-safe by order: a merged segment not yet in the manifest is merged
again by the next compaction (rows are deduplicated by ``last_seq``); a
pointer that did not move keeps its segment alive (inputs are deleted only
once they are recorded as superseded, after every pointer was moved). A
reader that meets a deleted segment falls back to replay.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pyarrow as pa

from projector.archiveindex import ArchiveIndex
from projector.cache import CacheEntry, Pointer, ProjectionCache, SegmentPointer
from projector.errors import ProjectorError
from projector.fanout import fan_out
from projector.snapshots import SegmentRow, SnapshotError, SnapshotStore

DEFAULT_MIN_SEGMENTS = 16  # compact once a shard has this many segments not compacted yet
DEFAULT_MAX_COMPACTED = 8  # and fold the compacted ones together once there are this many
DEFAULT_GRACE_S = 600.0
_UNREADABLE = CacheEntry(revision=0)  # stands for an entry that could not be read: the row is kept


class SegmentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A compacted segment: its rows are sorted by execution id, from ``min_id`` to ``max_id``."""

    segment: str
    rows: int
    min_id: int
    max_id: int


class Superseded(msgspec.Struct, frozen=True, kw_only=True):
    segment: str
    at: float  # seconds since the epoch


class SegmentManifest(msgspec.Struct, kw_only=True):
    """The shard's compacted segments (oldest first) and the merged ones waiting to be deleted."""

    segments: list[SegmentInfo] = msgspec.field(default_factory=list)
    superseded: list[Superseded] = msgspec.field(default_factory=list)


class CompactionReport(msgspec.Struct, frozen=True, kw_only=True):
    segment: str | None
    inputs: int
    rows: int
    pointers_moved: int
    deleted: int
    archived_dropped: int = 0


def compaction_settings(env: Mapping[str, str] | None = None) -> tuple[int, float]:
    """(``NOETL_COMPACT_SEGMENTS``, ``NOETL_COMPACT_GRACE`` in seconds) from the environment, checked.

    >>> compaction_settings({})
    (16, 600.0)
    """
    env = os.environ if env is None else env
    try:
        segments = int(env.get("NOETL_COMPACT_SEGMENTS") or DEFAULT_MIN_SEGMENTS)
        grace = float(env.get("NOETL_COMPACT_GRACE") or DEFAULT_GRACE_S)
    except ValueError as e:
        raise ProjectorError(f"NOETL_COMPACT_SEGMENTS must be an integer and NOETL_COMPACT_GRACE seconds: {e}") from e
    if segments < 2 or grace < 0:
        raise ProjectorError("NOETL_COMPACT_SEGMENTS must be >= 2 and NOETL_COMPACT_GRACE >= 0")
    return segments, grace


_manifest_decoder = msgspec.json.Decoder(SegmentManifest)
_encoder = msgspec.json.Encoder()


def read_manifest(store: SnapshotStore, shard: int) -> SegmentManifest:
    """The shard's manifest; an empty one if there is none yet."""
    try:
        return _manifest_decoder.decode(store.read_object(store.manifest_path(shard)))
    except FileNotFoundError:
        return SegmentManifest()
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise SnapshotError(f"the segment manifest of shard {shard} is unreadable: {e}") from e


def write_manifest(store: SnapshotStore, shard: int, manifest: SegmentManifest) -> None:
    try:
        store.write_object(store.manifest_path(shard), _encoder.encode(manifest))
    except OSError as e:
        raise SnapshotError(f"could not write the segment manifest of shard {shard}: {e}") from e


def merge_rows(tables: Sequence[pa.Table]) -> list[SegmentRow]:
    """The newest row of each execution across ``tables`` (later tables win a tie), sorted by execution id."""
    newest: dict[str, dict[str, Any]] = {}
    for table in tables:
        for row in table.to_pylist():
            seen = newest.get(row["execution_id"])
            if seen is None or row["last_seq"] >= seen["last_seq"]:
                newest[row["execution_id"]] = row
    return [msgspec.convert(newest[key], SegmentRow) for key in sorted(newest, key=int)]


class Compactor:
    """Merges one shard's small segments; see the module docstring."""

    def __init__(
        self,
        store: SnapshotStore,
        *,
        min_segments: int = DEFAULT_MIN_SEGMENTS,
        max_compacted: int = DEFAULT_MAX_COMPACTED,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.store = store
        self.min_segments = min_segments
        self.max_compacted = max_compacted
        self.grace_s = grace_s

    async def compact(
        self, shard: int, cache: ProjectionCache, *, force: bool = False, archive: ArchiveIndex | None = None
    ) -> CompactionReport | None:
        """Compact ``shard`` if it has enough segments (or ``force``); None when there was nothing to do.

        With ``archive`` (the shard's index of archived executions), rows of executions that were
        archived (no KV entry, and in the index's id ranges) are left out of the merged segment.
        """
        manifest = await asyncio.to_thread(read_manifest, self.store, shard)
        deleted = await asyncio.to_thread(self._delete_expired, shard, manifest)
        compacted = {s.segment for s in manifest.segments}
        waiting = {s.segment for s in manifest.superseded}
        segments = await asyncio.to_thread(self.store.list_segments, shard)
        small = [s for s in segments if s not in compacted and s not in waiting]
        present = [s.segment for s in manifest.segments]
        if len(present) + (1 if small else 0) > self.max_compacted or (force and len(present) + len(small) > 1):
            inputs = present + small  # fold the compacted ones together too
        elif len(small) >= self.min_segments or (force and small):
            inputs = small
        else:
            inputs = []
        if not inputs:
            return CompactionReport(segment=None, inputs=0, rows=0, pointers_moved=0, deleted=deleted) if deleted else None
        tables = [await asyncio.to_thread(self.store.read_segment, uri) for uri in inputs]
        rows = merge_rows(tables)
        entries = await self._entries(cache, rows)
        if archive is not None:
            # An archived execution's KV entry is gone and its projection is in the archive's index:
            # its rows here are dropped, so these segments hold the retention window, not all time.
            index = await archive.manifest(newer_than=time.monotonic())
            kept = [(row, entry) for row, entry in zip(rows, entries, strict=True)
                    if entry is not None or not any(s.holds(int(row.execution_id)) for s in index.segments)]
            dropped = len(rows) - len(kept)
            rows, entries = [r for r, _ in kept], [e for _, e in kept]
        else:
            dropped = 0
        uri: str | None = None
        if rows:
            uri = await asyncio.to_thread(self.store.write_segment, shard, rows, indexed=True)
        moved = 0 if uri is None else await self._move_pointers(cache, rows, entries, uri, set(inputs))
        now = time.time()
        merged = set(inputs)
        manifest.segments = [s for s in manifest.segments if s.segment not in merged]
        if uri is not None:
            manifest.segments.append(
                SegmentInfo(segment=uri, rows=len(rows), min_id=int(rows[0].execution_id), max_id=int(rows[-1].execution_id))
            )
        manifest.superseded += [Superseded(segment=s, at=now) for s in inputs]
        await asyncio.to_thread(write_manifest, self.store, shard, manifest)
        return CompactionReport(segment=uri, inputs=len(inputs), rows=len(rows), pointers_moved=moved, deleted=deleted,
                                archived_dropped=dropped)  # fmt: skip

    async def _entries(self, cache: ProjectionCache, rows: list[SegmentRow]) -> list[CacheEntry | None]:
        async def one(row: SegmentRow) -> CacheEntry | None:
            try:
                return await cache.get(row.execution_id)
            except ProjectorError:
                return _UNREADABLE  # an entry system/project cannot read either: kept, never pointed at

        return await fan_out(one, rows, limit=32)

    async def _move_pointers(
        self, cache: ProjectionCache, rows: list[SegmentRow], entries: list[CacheEntry | None], uri: str, inputs: set[str]
    ) -> int:
        moved = 0
        for index, (row, entry) in enumerate(zip(rows, entries, strict=True)):
            if entry is None or entry.pointer is None or entry.pointer.pointer.segment not in inputs:
                continue  # inline (folded further), or pointing at a segment this compaction did not merge
            pointer = Pointer(pointer=SegmentPointer(segment=uri, row=index), last_seq=row.last_seq, status=row.status)
            try:
                await cache.put_pointer(row.execution_id, pointer, revision=entry.revision)
                moved += 1
            except ProjectorError:
                pass  # changed meanwhile: the newer value stands, and the old segment is kept for the grace period
        return moved

    def _delete_expired(self, shard: int, manifest: SegmentManifest) -> int:
        now = time.time()
        expired = [s for s in manifest.superseded if now - s.at >= self.grace_s]
        if not expired:
            return 0
        for s in expired:
            self.store.delete(s.segment)
        manifest.superseded = [s for s in manifest.superseded if now - s.at < self.grace_s]
        write_manifest(self.store, shard, manifest)
        return len(expired)
