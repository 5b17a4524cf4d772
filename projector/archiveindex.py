"""The index of archived executions: sorted Arrow segments and a manifest fenced in KV.

Once ``system/cleanup`` archives an execution, its KV keys go (``proj_<shard>``
is a cache, not the index of record): what is left of it is a row in an
*index segment* of the shard, ``<objects>/history/shard=<n>/index/*.arrow``,
one row per archived execution, sorted by execution id (snowflake ids are
time-ordered), with its final projection (the fold of its archived history),
where its history is (:class:`ArchiveRef`, the parts of history segments) and
the columns a listing filters on. A segment satisfies the Feather segment
contract of the design of record (``execution_id``, ``tenant``, ``project``,
``status``, ``last_seq``, ``event_count``, ``projection``), so any Arrow tool
reads it.

Which index segments exist, and the execution id range of each of their
record batches, is the shard's :class:`IndexManifest`: one KV key
(``hist_<shard>`` key ``index``), written compare-and-set, so a kernel that
lost its lease cannot overwrite what the new holder recorded, and a reader
pays one direct get to know it is current. A point read takes the batches
whose id range holds the execution from the manifest, and opens only the
files that hold such a batch (one, unless the execution was archived twice),
decoding one batch in each.

Bounded: index segments are merged size-tiered (:data:`FANOUT` segments of a
level become one of the next level), so a shard keeps a few dozen of them
whatever the number of archived executions; merged inputs are deleted after
a grace period, so a reader holding the previous manifest still finds them.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import nats.errors
import pyarrow as pa
import pyarrow.ipc
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from locator.subjects import hist_bucket, proj_bucket
from projector.errors import ProjectorError
from projector.objects import ObjectRoot
from projector.visibility import VisibilityIndex

INDEX_KEY = "index"
BATCH_ROWS = 256  # rows per record batch: a point read decompresses one batch of this many projections
FANOUT = 8  # size-tiered merging: this many segments of one level become one segment of the next
DEFAULT_GRACE_S = 600.0
ROWS_REMEMBERED = 1024  # per shard and connection
MAX_AGE_S = 2.0  # a hit is served from a manifest at most this old
# How often an archived execution's KV entry is read and purged before it is left: each new round needs a
# write made from the revision purged before (a pointer to the same projection), so two nearly always do.
DROP_ATTEMPTS = 4

INDEX_SCHEMA = pa.schema(
    [
        pa.field("execution_id", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("project", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("last_seq", pa.uint64(), nullable=False),
        pa.field("event_count", pa.uint64(), nullable=False),
        pa.field("projection", pa.string(), nullable=False),  # canonical JSON, as in the Feather segments
        pa.field("history", pa.string(), nullable=False),  # the ArchiveRef, JSON
        pa.field("playbook", pa.string(), nullable=False),  # the playbook's path ("" for a raw stream)
        pa.field("created_at", pa.string(), nullable=False),
        pa.field("updated_at", pa.string(), nullable=False),
    ]
)


class ArchiveError(ProjectorError):
    """An archive segment or the index of archived executions could not be written or read, or did not match the WAL."""


class ArchivePart(msgspec.Struct, frozen=True, kw_only=True):
    """Rows ``[row, row + rows)`` of ``segment``: the execution's messages with seqs ``first_seq``…``last_seq``."""

    segment: str
    row: int
    rows: int
    first_seq: int
    last_seq: int
    digest: str


class ArchiveRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where one execution's archived history is (an index row's ``history`` column)."""

    tenant: str
    project: str
    parts: tuple[ArchivePart, ...]
    archived_at: str

    @property
    def last_seq(self) -> int:
        return self.parts[-1].last_seq if self.parts else 0

    @property
    def count(self) -> int:
        return sum(p.rows for p in self.parts)


class IndexRow(msgspec.Struct, frozen=True, kw_only=True):
    """One archived execution: its final projection and where its history is."""

    execution_id: str
    tenant: str
    project: str
    status: str
    last_seq: int
    event_count: int
    projection: str
    history: str
    playbook: str = ""
    created_at: str = ""
    updated_at: str = ""

    @property
    def ref(self) -> ArchiveRef:
        try:
            return _ref_decoder.decode(self.history)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ArchiveError(f"the archive ref of {self.execution_id} is unreadable: {e}") from e


class IndexSegment(msgspec.Struct, frozen=True, kw_only=True):
    """An index segment: its rows, its level, and each record batch's first and last execution id."""

    segment: str
    rows: int
    level: int
    batches: tuple[tuple[int, int], ...]

    def holds(self, wanted: int) -> list[int]:
        """The batches whose id range holds ``wanted``."""
        return [i for i, (low, high) in enumerate(self.batches) if low <= wanted <= high]


class Superseded(msgspec.Struct, frozen=True, kw_only=True):
    segment: str
    at: float  # seconds since the epoch


class IndexManifest(msgspec.Struct, kw_only=True):
    """A shard's index segments, oldest first, and the merged ones waiting for their grace period."""

    segments: list[IndexSegment] = msgspec.field(default_factory=list)
    superseded: list[Superseded] = msgspec.field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)


_ref_decoder = msgspec.json.Decoder(ArchiveRef)
_manifest_decoder = msgspec.json.Decoder(IndexManifest)
_encoder = msgspec.json.Encoder(order="sorted")


def encode_ref(ref: ArchiveRef) -> str:
    return _encoder.encode(ref).decode()


def level_of(rows: int) -> int:
    """The size tier of a segment of ``rows`` rows.

    >>> [level_of(n) for n in (1, 7, 8, 63, 64, 4096)]
    [0, 0, 1, 1, 2, 4]
    """
    return 0 if rows < FANOUT else int(math.log(rows, FANOUT) + 1e-9)


def newest_rows(rows: Iterable[IndexRow]) -> list[IndexRow]:
    """One row per execution (the one with the highest ``last_seq``; later wins a tie), sorted by execution id."""
    newest: dict[str, IndexRow] = {}
    for row in rows:
        seen = newest.get(row.execution_id)
        if seen is None or row.last_seq >= seen.last_seq:
            newest[row.execution_id] = row
    return [newest[k] for k in sorted(newest, key=int)]


def _encode(rows: Sequence[IndexRow]) -> tuple[bytes, tuple[tuple[int, int], ...]]:
    columns = {name: [getattr(row, name) for row in rows] for name in INDEX_SCHEMA.names}
    try:
        table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
        batches = [b for b in table.to_batches(max_chunksize=BATCH_ROWS) if b.num_rows]
        ranges = tuple((int(b.column(0)[0].as_py()), int(b.column(0)[-1].as_py())) for b in batches)
        sink = pa.BufferOutputStream()
        options = pyarrow.ipc.IpcWriteOptions(compression="zstd")
        with pyarrow.ipc.new_file(sink, INDEX_SCHEMA, options=options) as writer:
            for batch in batches:
                writer.write_batch(batch)
    except (pa.ArrowException, OverflowError, TypeError, ValueError, OSError) as e:
        raise ArchiveError(f"could not encode an index segment: {e}") from e
    return bytes(sink.getvalue()), ranges


@dataclass
class _Known:
    """A process's copy of one shard's manifest, and the refresh in flight."""

    manifest: IndexManifest = field(default_factory=IndexManifest)
    revision: int | None = None
    fetched_at: float = -math.inf  # monotonic time the request that fetched it was sent
    refresh: asyncio.Task[None] | None = None
    refresh_started: float = -math.inf
    # Rows found lately in this manifest (a cold read looks its execution up twice: projection, then history).
    rows: OrderedDict[int, list[IndexRow]] = field(default_factory=OrderedDict)
    rows_of: IndexManifest | None = None


# Manifests known to this process, per NATS connection (its JetStream context) and shard.
_known: weakref.WeakKeyDictionary[JetStreamContext, dict[int, _Known]] = weakref.WeakKeyDictionary()


class ArchiveIndex:
    """The index of one shard's archived executions; see the module docstring.

    Cheap to build (readers build one per read): the manifest is cached per
    connection and fetched again only when a lookup misses, so an execution
    archived a moment ago is always found, and a hit costs no NATS round trip.
    """

    def __init__(self, js: JetStreamContext, shard: int, root: ObjectRoot | None, *, max_age_s: float = MAX_AGE_S) -> None:
        self.js = js
        self.max_age_s = max_age_s
        self.shard = shard
        self.root = root
        bucket = hist_bucket(shard)
        self.bucket = bucket
        self.kv = KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=True)
        self.opened = 0  # index files opened by lookups (what a cold point read costs)

    # -- the manifest -------------------------------------------------------------------------------

    def _state(self) -> _Known:
        return _known.setdefault(self.js, {}).setdefault(self.shard, _Known())

    async def _fetch(self) -> tuple[IndexManifest, int | None]:
        try:
            entry = await self.kv.get(INDEX_KEY)
        except (NotFoundError, nats.errors.NoRespondersError):
            return IndexManifest(), None  # nothing archived yet (or a cell bootstrapped before the archive)
        assert entry.value is not None
        try:
            return _manifest_decoder.decode(entry.value), entry.revision
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ArchiveError(f"the index manifest in {self.bucket} is unreadable: {e}") from e

    async def manifest(self, *, newer_than: float | None = None) -> IndexManifest:
        """The manifest; fetched again unless the copy held was requested after ``newer_than`` (monotonic).

        ``newer_than=None``: the copy held if it is younger than ``max_age_s``. Concurrent callers share one fetch.
        """
        state = self._state()
        if newer_than is None:
            # The copy held serves for max_age_s: an execution archived again (after a late event) is seen
            # within that, and a miss always asks again (see get_row).
            newer_than = time.monotonic() - self.max_age_s
        if state.fetched_at >= newer_than:
            return state.manifest
        limit = newer_than
        while state.fetched_at < limit:
            if state.refresh is None or state.refresh.done() or state.refresh_started < limit:
                started = time.monotonic()

                async def refresh(started: float = started) -> None:
                    manifest, revision = await self._fetch()
                    if started >= state.fetched_at:
                        if revision is None or revision != state.revision:  # the same revision keeps its rows
                            state.manifest, state.revision = manifest, revision
                        state.fetched_at = started

                state.refresh, state.refresh_started = asyncio.ensure_future(refresh()), started
            await asyncio.shield(state.refresh)
        manifest: IndexManifest = state.manifest
        return manifest

    async def drop_entry(self, execution_id: str, last_seq: int) -> bool:
        """Remove an archived execution's KV entry (``proj_<shard>``) and listing key, unless it folded past ``last_seq``.

        Its index row holds the projection now. Removed without a marker: a purge of the key's subject up to
        the revision read, so a late fold written meanwhile survives; read and purged again while something
        replaced the entry read with one that folded nothing more (system/materialize's pointer to the same
        projection). Returns whether an entry was removed.
        """
        bucket = proj_bucket(self.shard)
        dropped = False
        for _ in range(DROP_ATTEMPTS):
            try:
                entry = await self.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{execution_id}", direct=True)
            except NotFoundError:
                return dropped
            if entry.seq is None or entry.data is None or entry_last_seq(entry.data) > last_seq:
                return dropped
            if not dropped:
                await VisibilityIndex(self.js, self.shard).forget(execution_id)  # listed from the index now
            await self.js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{execution_id}", seq=entry.seq + 1)
            dropped = True
        return dropped

    # -- reading ------------------------------------------------------------------------------------

    async def get_row(self, execution_id: str, *, tenant: str | None = None, project: str | None = None) -> IndexRow | None:
        """The execution's index row (None when it is not archived), newest if it was archived twice.

        With ``tenant``/``project``, a row of another tenant/project with the same id is no match.
        A miss asks NATS for the manifest once more, so an execution archived just now is found.
        """
        try:
            wanted = int(execution_id)
        except ValueError:
            return None  # not a snowflake id: nothing of it can be in the index
        asked = time.monotonic()
        row = await self._find(await self.manifest(), wanted, tenant, project)
        if row is None:
            row = await self._find(await self.manifest(newer_than=asked), wanted, tenant, project)
        return row

    async def get(self, execution_id: str) -> tuple[ArchiveRef | None, int | None]:
        """The execution's archive ref and its archived ``last_seq`` ((None, None) when not archived)."""
        row = await self.get_row(execution_id)
        return (None, None) if row is None else (row.ref, row.last_seq)

    async def _find(self, manifest: IndexManifest, wanted: int, tenant: str | None, project: str | None) -> IndexRow | None:
        state = self._state()
        if state.rows_of is manifest and wanted in state.rows:
            return max((r for r in state.rows[wanted] if tenant is None or (r.tenant, r.project) == (tenant, project)),
                       key=lambda r: r.last_seq, default=None)  # fmt: skip
        candidates = [(s, s.holds(wanted)) for s in manifest.segments]
        candidates = [(s, batches) for s, batches in candidates if batches]
        if not candidates:
            return None
        if self.root is None:
            raise ArchiveError(
                f"execution {wanted} is archived, and this reader was given no object store to read it from"
            )
        found: list[IndexRow] = []
        for segment, batches in candidates:
            try:
                found += await asyncio.to_thread(self._read_batches, segment.segment, batches, str(wanted))
            except FileNotFoundError:
                # Merged and deleted after its grace period: the manifest held is stale; read it again.
                fresh = await self.manifest(newer_than=time.monotonic())
                if fresh is manifest:
                    raise ArchiveError(f"index segment {segment.segment} is gone but still in the manifest") from None
                return await self._find(fresh, wanted, tenant, project)
        if state.rows_of is not manifest:
            state.rows, state.rows_of = OrderedDict(), manifest
        state.rows[wanted] = found
        while len(state.rows) > ROWS_REMEMBERED:
            state.rows.popitem(last=False)
        found = [r for r in found if tenant is None or (r.tenant, r.project) == (tenant, project)]
        return max(found, key=lambda r: r.last_seq, default=None)

    def _read_batches(self, uri: str, batches: Sequence[int], wanted: str) -> list[IndexRow]:
        assert self.root is not None
        try:
            path = self.root.path_of(uri)
        except ValueError as e:
            raise ArchiveError(str(e)) from e
        rows: list[IndexRow] = []
        try:
            self.opened += 1
            with self.root.fs.open(path, "rb", cache_type="none") as f:
                reader = pyarrow.ipc.open_file(f)
                for index in batches:
                    batch = reader.get_batch(index)
                    ids = batch.column("execution_id").to_pylist()
                    for offset, value in enumerate(ids):
                        if value == wanted:
                            rows.append(msgspec.convert(batch.slice(offset, 1).to_pylist()[0], type=IndexRow))
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException, msgspec.ValidationError) as e:
            raise ArchiveError(f"could not read index segment {uri}: {e}") from e
        return rows

    def read_segment(self, uri: str) -> list[IndexRow]:
        """Every row of one index segment, in id order."""
        assert self.root is not None
        try:
            table = pyarrow.ipc.open_file(pa.py_buffer(self.root.read(self.root.path_of(uri)))).read_all()
            return msgspec.convert(table.to_pylist(), type=list[IndexRow])
        except FileNotFoundError as e:
            raise ArchiveError(f"index segment not found: {uri}") from e
        except (OSError, ValueError, pa.ArrowException, msgspec.ValidationError) as e:
            raise ArchiveError(f"could not read index segment {uri}: {e}") from e

    # -- writing ------------------------------------------------------------------------------------

    def _write(self, rows: Sequence[IndexRow], level: int) -> IndexSegment:
        assert self.root is not None
        data, ranges = _encode(rows)
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex}.arrow"
        path = self.root.path("history", f"shard={self.shard}", "index", name)
        try:
            uri = self.root.write(path, data)
        except OSError as e:
            raise ArchiveError(f"could not write index segment {self.root.uri(path)}: {e}") from e
        return IndexSegment(segment=uri, rows=len(rows), level=level, batches=ranges)

    async def _update(self, change: Callable[[IndexManifest], IndexManifest | None]) -> IndexManifest:
        """Apply ``change(manifest) -> manifest | None`` compare-and-set, again on a conflict."""
        for _ in range(20):
            manifest, revision = await self._fetch()
            new = change(manifest)
            if new is None:
                return manifest
            data = _encoder.encode(new)
            try:
                if revision is None:
                    written = await self.kv.create(INDEX_KEY, data)
                else:
                    written = await self.kv.update(INDEX_KEY, data, last=revision)
            except KeyWrongLastSequenceError:
                continue  # another writer (a kernel that lost its lease, an operator's archive --now): again
            except nats.errors.NoRespondersError as e:
                raise ArchiveError(f"the {self.bucket} bucket is missing: run bootstrap (up and kernel do)") from e
            state = self._state()
            state.manifest, state.revision, state.fetched_at = new, int(written), time.monotonic()
            return new
        raise ArchiveError(f"the index manifest of shard {self.shard} kept changing under 20 writes")

    async def record(self, rows: Sequence[IndexRow]) -> IndexSegment:
        """Write ``rows`` as a new index segment and add it to the manifest; the archived executions are findable once this returns."""
        ordered = newest_rows(rows)
        if not ordered:
            raise ArchiveError(f"refusing to record an empty index segment for shard {self.shard}")
        segment = await asyncio.to_thread(self._write, ordered, level_of(len(ordered)))

        def add(manifest: IndexManifest) -> IndexManifest:
            manifest.segments.append(segment)
            return manifest

        await self._update(add)
        return segment

    async def merge(self, *, grace_s: float = DEFAULT_GRACE_S) -> int:
        """Merge the segments of the lowest level that has :data:`FANOUT` of them; delete inputs past their grace.

        Returns how many segments were merged (0 when none was due). Crash-safe: the merged segment is in
        the manifest before its inputs leave it, and inputs are deleted only after ``grace_s``.
        """
        manifest, _ = await self._fetch()
        await self._delete_expired(manifest, grace_s)
        by_level: dict[int, list[IndexSegment]] = {}
        for s in manifest.segments:
            by_level.setdefault(s.level, []).append(s)
        due = next((segs[:FANOUT] for _, segs in sorted(by_level.items()) if len(segs) >= FANOUT), None)
        if due is None:
            return 0
        rows: list[IndexRow] = []
        for s in due:
            rows += await asyncio.to_thread(self.read_segment, s.segment)
        merged_rows = newest_rows(rows)
        merged = await asyncio.to_thread(self._write, merged_rows, max(level_of(len(merged_rows)), due[0].level + 1))
        inputs = {s.segment for s in due}

        def replace(manifest: IndexManifest) -> IndexManifest | None:
            if not inputs <= {s.segment for s in manifest.segments}:
                return None  # another writer merged them meanwhile: ours is garbage, deleted below
            now = time.time()
            kept = [s for s in manifest.segments if s.segment not in inputs]
            manifest.segments = [merged, *kept]  # older rows first: a merge holds the oldest archives
            manifest.superseded += [Superseded(segment=s, at=now) for s in sorted(inputs)]
            return manifest

        after = await self._update(replace)
        if merged.segment not in {s.segment for s in after.segments}:
            await asyncio.to_thread(self._delete, merged.segment)
            return 0
        return len(due)

    async def _delete_expired(self, manifest: IndexManifest, grace_s: float) -> None:
        now = time.time()
        expired = {s.segment for s in manifest.superseded if now - s.at >= grace_s}
        if not expired:
            return
        for uri in expired:
            await asyncio.to_thread(self._delete, uri)

        def drop(manifest: IndexManifest) -> IndexManifest:
            manifest.superseded = [s for s in manifest.superseded if s.segment not in expired]
            return manifest

        await self._update(drop)

    def _delete(self, uri: str) -> None:
        assert self.root is not None
        try:
            self.root.fs.rm_file(self.root.path_of(uri))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise ArchiveError(f"could not delete index segment {uri}: {e}") from e


class _LastSeq(msgspec.Struct):
    last_seq: int = 0


_last_seq = msgspec.json.Decoder(_LastSeq)


def entry_last_seq(data: bytes) -> int:
    """The ``last_seq`` of a KV projection entry (a projection or a pointer); unreadable counts as newest."""
    try:
        return _last_seq.decode(data).last_seq
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 2**63
