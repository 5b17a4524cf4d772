"""Feather snapshot segments: terminal projections materialized to object storage.

A segment is one Arrow IPC file (Feather v2, zstd) holding one row per
execution. Its columns are a contract read by tools outside the project
(pyarrow, polars, duckdb), see ``ARCHITECTURE.md`` "Read path".
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.ipc

from projector.errors import ProjectorError
from projector.objects import ObjectRoot

SCHEMA = pa.schema(
    [
        pa.field("execution_id", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("project", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("last_seq", pa.uint64(), nullable=False),
        pa.field("event_count", pa.uint64(), nullable=False),
        pa.field("projection", pa.large_string(), nullable=False),
    ]
)

# Rows per record batch: read_row decompresses one batch, not the whole segment.
BATCH_ROWS = 128
_BATCH_ROWS_KEY = b"noetl.batch_rows"
# In a compacted (indexed) segment: JSON [[first id, last id], …] of each record batch.
_BATCH_RANGES_KEY = b"noetl.batch_id_ranges"
MANIFEST = "manifest.json"

_SEGMENT_NAME = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{32}\.feather")


class SnapshotError(ProjectorError):
    """A segment could not be written, found or read (missing file, bad row, bad URI, storage failure)."""


class SegmentRow(msgspec.Struct, frozen=True, kw_only=True):
    """One execution's row in a segment; ``projection`` is its canonical JSON text."""

    execution_id: str
    tenant: str
    project: str
    status: str
    last_seq: int
    event_count: int
    projection: str


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _segment_name() -> str:
    now = _utcnow()
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex}.feather"


def _encode(rows: Sequence[SegmentRow], *, indexed: bool = False) -> bytes:
    columns = {name: [getattr(row, name) for row in rows] for name in SCHEMA.names}
    try:
        table = pa.Table.from_pydict(columns, schema=SCHEMA)
    except (pa.ArrowException, OverflowError, TypeError) as e:
        raise SnapshotError(f"rows do not fit the segment schema: {e}") from e
    sink = pa.BufferOutputStream()
    options = pyarrow.ipc.IpcWriteOptions(compression="zstd")
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    metadata = {_BATCH_ROWS_KEY: str(BATCH_ROWS).encode()}
    if indexed:
        # Rows sorted by execution id: each batch's first and last id, so a point read opens one batch.
        ids = [int(r.execution_id) for r in rows]
        if ids != sorted(ids):
            raise SnapshotError("an indexed segment's rows must be sorted by execution id")
        ranges = [[int(b.column(0)[0].as_py()), int(b.column(0)[-1].as_py())] for b in batches if b.num_rows]
        metadata[_BATCH_RANGES_KEY] = msgspec.json.encode(ranges)
    schema = SCHEMA.with_metadata(metadata)
    try:
        with pyarrow.ipc.new_file(sink, schema, options=options) as writer:
            for batch in batches:
                writer.write_batch(batch)
    except (pa.ArrowException, OSError) as e:
        raise SnapshotError(f"could not encode segment: {e}") from e
    return bytes(sink.getvalue())


class SnapshotStore:
    """Arrow IPC (Feather v2) segments in object storage through fsspec.

    Segments live under ``<base>/segments/shard=<n>/`` and are named by their
    UTC write time, so names sort oldest first. A write is atomic: readers see
    a whole segment or none (``file://`` writes a hidden temp file and renames
    it; an S3 PUT is atomic already).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = SnapshotStore(f"file://{tmp.name}/objects")
    >>> row = SegmentRow(execution_id="e1", tenant="acme", project="etl", status="COMPLETED",
    ...                  last_seq=7, event_count=7, projection='{"status":"COMPLETED"}')
    >>> uri = store.write_segment(0, [row])
    >>> store.list_segments(0) == [uri]
    True
    >>> store.read_row(uri, 0) == row
    True
    >>> store.delete(uri)
    >>> store.list_segments(0)
    []
    >>> tmp.cleanup()
    """

    def __init__(self, base_url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self._root = ObjectRoot(base_url, storage_options=storage_options)
        self.base_url = self._root.base_url
        self.storage_options = self._root.storage_options
        self._fs, self._base = self._root.fs, self._root.base
        self.opened = 0  # segment files opened for reading (what a cold read costs)
        self.batches_read = 0  # record batches decoded by point reads

    @classmethod
    def from_env(cls, *, data_dir: Path, env: Mapping[str, str] | None = None) -> SnapshotStore:
        """``NOETL_OBJECTS_URL`` (default ``file://<data_dir>/objects``); for ``s3://`` also
        ``NOETL_S3_ENDPOINT_URL`` and the usual ``AWS_*`` credentials and region."""
        root = ObjectRoot.from_env(data_dir=data_dir, env=env)
        return cls(root.base_url, storage_options=root.storage_options)

    def write_segment(self, shard: int, rows: Sequence[SegmentRow], *, indexed: bool = False) -> str:
        """Write ``rows`` (in order) as one new segment of ``shard``; return its full URI.

        ``indexed``: the rows are sorted by execution id, and each batch's id range is recorded (compaction).
        """
        if not rows:
            raise SnapshotError(f"refusing to write an empty segment for shard {shard}")
        data = _encode(rows, indexed=indexed)
        directory = self._shard_dir(shard)
        path = f"{directory}/{_segment_name()}"
        try:
            return self._root.write(path, data)
        except OSError as e:
            raise SnapshotError(f"could not write segment {self._root.uri(path)}: {e}") from e

    def read_row(self, uri: str, row: int) -> SegmentRow:
        """Row ``row`` (0-based) of the segment at ``uri``, reading only the record batch that holds it."""
        path = self._path(uri)
        if row < 0:
            raise SnapshotError(f"row {row} is out of range for segment {uri}")
        try:
            self.opened += 1
            with self._fs.open(path, "rb", cache_type="none") as f:
                reader = pyarrow.ipc.open_file(f)
                batch, offset = self._locate(reader, row, uri)
                self.batches_read += 1
                values = batch.slice(offset, 1).to_pylist()[0]
        except FileNotFoundError as e:
            raise SnapshotError(f"segment not found: {uri}") from e
        except (OSError, pa.ArrowException) as e:
            raise SnapshotError(f"could not read segment {uri}: {e}") from e
        try:
            return msgspec.convert(values, type=SegmentRow)
        except msgspec.ValidationError as e:
            raise SnapshotError(f"segment {uri} row {row} does not match the segment schema: {e}") from e

    def read_segment(self, uri: str) -> pa.Table:
        """The whole segment at ``uri`` as a table."""
        path = self._path(uri)
        try:
            self.opened += 1
            data = self._root.read(path)
            return pyarrow.ipc.open_file(pa.py_buffer(data)).read_all()
        except FileNotFoundError as e:
            raise SnapshotError(f"segment not found: {uri}") from e
        except (OSError, pa.ArrowException) as e:
            raise SnapshotError(f"could not read segment {uri}: {e}") from e

    def manifest_path(self, shard: int) -> str:
        return f"{self._shard_dir(shard)}/{MANIFEST}"

    def read_object(self, path: str) -> bytes:
        """An object of this store (``FileNotFoundError`` if there is none)."""
        return self._root.read(path)

    def write_object(self, path: str, data: bytes) -> None:
        self._root.write(path, data)

    def find(
        self, shard: int, *, tenant: str, project: str, execution_id: str, max_segments: int = 32
    ) -> tuple[str, int] | None:
        """(segment URI, row) of the newest row for an execution; see :meth:`find_row`."""
        found = self.find_row(shard, tenant=tenant, project=project, execution_id=execution_id, max_segments=max_segments)
        return None if found is None else (found[0], found[1])

    def find_row(
        self, shard: int, *, tenant: str, project: str, execution_id: str, max_segments: int = 32
    ) -> tuple[str, int, SegmentRow] | None:
        """(segment URI, row number, row) of the newest row for an execution, scanning at most ``max_segments``.

        The cold path when the KV entry (and so its pointer) is gone: bounded, newest first. Segments
        not compacted yet are scanned; compacted ones are found through the shard's manifest (their id
        ranges), and within one only the record batch whose id range holds the execution is read: a
        compacted shard answers a point read by opening one segment file and decoding one batch.
        """
        from projector.compaction import read_manifest  # the manifest's format lives with compaction

        manifest = read_manifest(self, shard)
        compacted = {s.segment for s in manifest.segments}
        superseded = {s.segment for s in manifest.superseded}
        fresh = [s for s in self.list_segments(shard) if s not in compacted and s not in superseded]
        found = self._scan(reversed(fresh[-max_segments:]), tenant=tenant, project=project, execution_id=execution_id)
        if found is not None:
            return found
        wanted = int(execution_id)
        for info in reversed(manifest.segments):
            if info.min_id <= wanted <= info.max_id:
                hit = self._indexed_row(info.segment, wanted, tenant=tenant, project=project)
                if hit is not None:
                    return info.segment, hit[0], hit[1]
        return None

    def _indexed_row(self, uri: str, wanted: int, *, tenant: str, project: str) -> tuple[int, SegmentRow] | None:
        """(row number, row) of execution ``wanted`` in a compacted segment, decoding one record batch."""
        path = self._path(uri)
        try:
            self.opened += 1
            with self._fs.open(path, "rb", cache_type="none") as f:
                reader = pyarrow.ipc.open_file(f)
                metadata = reader.schema.metadata or {}
                ranges = msgspec.json.decode(metadata.get(_BATCH_RANGES_KEY, b"[]"), type=list[tuple[int, int]])
                per_batch = int(metadata.get(_BATCH_ROWS_KEY, 0))
                for index, (low, high) in enumerate(ranges):
                    if low <= wanted <= high:
                        batch = reader.get_batch(index)
                        self.batches_read += 1
                        ids = batch.column("execution_id").to_pylist()
                        for offset, value in enumerate(ids):
                            if value == str(wanted):
                                row = msgspec.convert(batch.slice(offset, 1).to_pylist()[0], type=SegmentRow)
                                if (row.tenant, row.project) == (tenant, project):
                                    return index * per_batch + offset, row
                        return None
        except FileNotFoundError:
            return None  # deleted after its grace period: the caller falls back to replay
        except (OSError, pa.ArrowException, msgspec.DecodeError, msgspec.ValidationError) as e:
            raise SnapshotError(f"could not read segment {uri}: {e}") from e
        return None

    def _scan(self, uris: Any, *, tenant: str, project: str, execution_id: str) -> tuple[str, int, SegmentRow] | None:
        for uri in uris:
            table = self.read_segment(uri)
            ids = table.column("execution_id").to_pylist()
            tenants = table.column("tenant").to_pylist()
            projects = table.column("project").to_pylist()
            for row in range(len(ids) - 1, -1, -1):
                if ids[row] == execution_id and tenants[row] == tenant and projects[row] == project:
                    return uri, row, msgspec.convert(table.slice(row, 1).to_pylist()[0], type=SegmentRow)
        return None

    def list_segments(self, shard: int) -> list[str]:
        """URIs of ``shard``'s segments, oldest first; temp files of unfinished writes are left out."""
        directory = self._shard_dir(shard)
        # Another process may have written since this fs instance cached the listing.
        self._fs.invalidate_cache(directory)
        try:
            paths = self._fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise SnapshotError(f"could not list segments of shard {shard}: {e}") from e
        names = sorted(p.rsplit("/", 1)[-1] for p in paths)
        return [self._root.uri(f"{directory}/{n}") for n in names if _SEGMENT_NAME.fullmatch(n)]

    def delete(self, uri: str) -> None:
        """Delete one segment of this store; a segment already gone is not an error (retries are safe)."""
        path = self._path(uri)
        parent, _, name = path.rpartition("/")
        if not (_SEGMENT_NAME.fullmatch(name) and parent.startswith(f"{self._base}/segments/shard=")):
            raise SnapshotError(f"not a segment of the store at {self.base_url}: {uri}")
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SnapshotError(f"could not delete segment {uri}: {e}") from e

    def _shard_dir(self, shard: int) -> str:
        if shard < 0:
            raise SnapshotError(f"shard must be >= 0, got {shard}")
        return f"{self._base}/segments/shard={shard}"

    def _path(self, uri: str) -> str:
        try:
            return self._root.path_of(uri)
        except ValueError as e:
            raise SnapshotError(f"segment URI {uri!r} is not on this store's filesystem ({self.base_url})") from e

    @staticmethod
    def _locate(reader: pyarrow.ipc.RecordBatchFileReader, row: int, uri: str) -> tuple[pa.RecordBatch, int]:
        metadata = reader.schema.metadata or {}
        per_batch = int(metadata.get(_BATCH_ROWS_KEY, 0))
        if per_batch > 0:
            index, offset = divmod(row, per_batch)
            if index < reader.num_record_batches:
                batch = reader.get_batch(index)
                if offset < batch.num_rows:
                    return batch, offset
        else:
            # Written by another tool: batch sizes are unknown, walk them.
            offset = row
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                if offset < batch.num_rows:
                    return batch, offset
                offset -= batch.num_rows
        raise SnapshotError(f"row {row} is out of range for segment {uri} ({reader.count_rows()} rows)")
