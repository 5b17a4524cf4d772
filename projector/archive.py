"""The history archive: an execution's WAL messages, byte for byte, in Arrow IPC segments in object storage.

The cold tier of an execution's history. A segment holds many executions,
one row per stored message, in the columns the design of record fixes
(``seq``, ``stored_at``, ``subject``, ``headers``, ``data``, ``execution_id``,
``tenant``, ``project``), zstd-compressed, so any Arrow tool reads it without
noetl-edge. Segments live under ``<objects>/history/shard=<n>/``.

Where an execution's archived part is kept, and its final projection: its row
in the shard's index of archived executions (:mod:`projector.archiveindex`).
A reader of history reads those parts first, then the WAL after the last
archived seq; the WAL messages are purged only once the archive is written,
read back, checked against what was read from the WAL, and its index row is
recorded; the execution's KV entry goes last. See :class:`Archiver`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import nats.errors
import pyarrow as pa
import pyarrow.ipc
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from locator.envelope import EnvelopeError, decode_wal_message
from locator.subjects import execution_filter, proj_bucket, wal_consumer, wal_stream
from projector.archiveindex import ArchiveError, ArchiveIndex, ArchivePart, ArchiveRef, IndexRow, encode_ref, entry_last_seq
from projector.errors import ProjectorError
from projector.fold import WalEvent, fold
from projector.objects import ObjectRoot
from projector.projection import canonical, decode_projection
from projector.walread import StoredMessage, read_subject

__all__ = [
    "ArchiveError", "ArchiveIndex", "ArchivePart", "ArchiveRef", "ArchiveReport", "ArchivedExecution", "Archiver",
    "HistoryArchive", "archived_messages", "digest", "read_stored",
]

HISTORY_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("stored_at", pa.timestamp("ns", tz="UTC"), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("headers", pa.string(), nullable=False),  # JSON object text ({} when none)
        pa.field("data", pa.large_binary(), nullable=False),  # the exact stored bytes
        pa.field("execution_id", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("project", pa.string(), nullable=False),
    ]
)
# Rows per record batch: a point read decompresses the batches that hold one execution, not the segment.
BATCH_ROWS = 1024
_BATCH_ROWS_KEY = b"noetl.batch_rows"


_encoder = msgspec.json.Encoder(order="sorted")


def digest(messages: Iterable[StoredMessage]) -> str:
    """sha256 over each message's seq, subject and exact bytes, in order.

    >>> digest([]) == hashlib.sha256().hexdigest()
    True
    """
    h = hashlib.sha256()
    for m in messages:
        subject = m.subject.encode()
        h.update(m.seq.to_bytes(8, "big") + len(subject).to_bytes(4, "big") + subject)
        h.update(len(m.data).to_bytes(8, "big") + m.data)
    return h.hexdigest()


async def read_stored(
    js: JetStreamContext,
    *,
    shard: int,
    tenant: str,
    project: str,
    execution_id: str,
    after_seq: int = 0,
    idle_timeout: float = 5.0,
) -> list[StoredMessage]:
    """Every message of the execution's WAL subject after ``after_seq``, as stored (poison included)."""
    try:
        return [
            m async for m in read_subject(
                js, wal_stream(shard), execution_filter(shard, tenant, project, execution_id), after_seq=after_seq,
                idle_timeout=idle_timeout,
            )
        ]
    except ProjectorError as e:
        raise ArchiveError(f"reading {execution_id} from {wal_stream(shard)}: {e}") from e


class ArchivedExecution(NamedTuple):
    tenant: str
    project: str
    execution_id: str
    messages: Sequence[StoredMessage]


def _encode(executions: Sequence[ArchivedExecution]) -> bytes:
    columns: dict[str, list[Any]] = {name: [] for name in HISTORY_SCHEMA.names}
    for ex in executions:
        for m in ex.messages:
            columns["seq"].append(m.seq)
            columns["stored_at"].append(m.stored_at_ns)
            columns["subject"].append(m.subject)
            columns["headers"].append(json.dumps(m.headers, sort_keys=True, ensure_ascii=False))
            columns["data"].append(m.data)
            columns["execution_id"].append(ex.execution_id)
            columns["tenant"].append(ex.tenant)
            columns["project"].append(ex.project)
    try:
        table = pa.Table.from_pydict(columns, schema=HISTORY_SCHEMA)
        sink = pa.BufferOutputStream()
        schema = HISTORY_SCHEMA.with_metadata({_BATCH_ROWS_KEY: str(BATCH_ROWS).encode()})
        options = pyarrow.ipc.IpcWriteOptions(compression="zstd")
        with pyarrow.ipc.new_file(sink, schema, options=options) as writer:
            for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                writer.write_batch(batch)
    except (pa.ArrowException, OverflowError, TypeError, OSError) as e:
        raise ArchiveError(f"could not encode a history segment: {e}") from e
    return bytes(sink.getvalue())


def _messages(table: pa.Table) -> list[StoredMessage]:
    stored = table.column("stored_at").cast(pa.int64()).to_pylist()
    return [
        StoredMessage(seq, at, subject, json.loads(headers), data)
        for seq, at, subject, headers, data in zip(
            table.column("seq").to_pylist(),
            stored,
            table.column("subject").to_pylist(),
            table.column("headers").to_pylist(),
            table.column("data").to_pylist(),
            strict=True,
        )
    ]


class HistoryArchive:
    """History segments in object storage, under ``<base>/history/shard=<n>/``.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> archive = HistoryArchive(ObjectRoot(f"file://{tmp.name}/objects"))
    >>> m = StoredMessage(5, 1_000_000_000, "wal.0.a.b.42.user.x", {}, b'{"v":1}')
    >>> uri, parts = archive.write_segment(0, [ArchivedExecution("a", "b", "42", [m])])
    >>> archive.read_part(parts["42"]) == [m]
    True
    >>> tmp.cleanup()
    """

    def __init__(self, root: ObjectRoot) -> None:
        self.root = root

    @classmethod
    def at(cls, base_url: str, *, storage_options: dict[str, Any] | None = None) -> HistoryArchive:
        return cls(ObjectRoot(base_url, storage_options=storage_options))

    def write_segment(self, shard: int, executions: Sequence[ArchivedExecution]) -> tuple[str, dict[str, ArchivePart]]:
        """Write one segment (executions in the given order); its URI and each execution's part."""
        if not executions or not all(ex.messages for ex in executions):
            raise ArchiveError(f"refusing to archive nothing for shard {shard}")
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex}.arrow"
        path = self.root.path("history", f"shard={shard}", name)
        try:
            uri = self.root.write(path, _encode(executions))
        except OSError as e:
            raise ArchiveError(f"could not write history segment {self.root.uri(path)}: {e}") from e
        parts: dict[str, ArchivePart] = {}
        row = 0
        for ex in executions:
            parts[ex.execution_id] = ArchivePart(
                segment=uri, row=row, rows=len(ex.messages), first_seq=ex.messages[0].seq,
                last_seq=ex.messages[-1].seq, digest=digest(ex.messages),
            )
            row += len(ex.messages)
        return uri, parts

    def read_part(self, part: ArchivePart) -> list[StoredMessage]:
        """The messages of one part, reading only the record batches that hold its rows."""
        try:
            path = self.root.path_of(part.segment)
        except ValueError as e:
            raise ArchiveError(str(e)) from e
        try:
            with self.root.fs.open(path, "rb", cache_type="none") as f:
                reader = pyarrow.ipc.open_file(f)
                per_batch = int((reader.schema.metadata or {}).get(_BATCH_ROWS_KEY, 0)) or None
                batches = []
                if per_batch:
                    first, last = part.row // per_batch, (part.row + part.rows - 1) // per_batch
                    offset = part.row - first * per_batch
                    for index in range(first, min(last + 1, reader.num_record_batches)):
                        batches.append(reader.get_batch(index))
                else:
                    offset = part.row
                    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                table = pa.Table.from_batches(batches, schema=reader.schema).slice(offset, part.rows)
        except FileNotFoundError as e:
            raise ArchiveError(f"history segment not found: {part.segment}") from e
        except (OSError, pa.ArrowException) as e:
            raise ArchiveError(f"could not read history segment {part.segment}: {e}") from e
        messages = _messages(table)
        if len(messages) != part.rows:
            raise ArchiveError(f"history segment {part.segment} has {len(messages)} of rows {part.row}+{part.rows}")
        return messages

    def verify_segment(self, uri: str, parts: Sequence[ArchivePart]) -> None:
        """Read the whole segment once and check every part's count, seq range and digest against it."""
        try:
            table = pyarrow.ipc.open_file(pa.py_buffer(self.root.read(self.root.path_of(uri)))).read_all()
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ArchiveError(f"could not read back history segment {uri}: {e}") from e
        for part in parts:
            messages = _messages(table.slice(part.row, part.rows))
            if (len(messages), messages[0].seq if messages else None, messages[-1].seq if messages else None,
                    digest(messages)) != (part.rows, part.first_seq, part.last_seq, part.digest):
                raise ArchiveError(f"history segment {uri} rows {part.row}+{part.rows} do not match the WAL")

    def read_segment(self, uri: str) -> list[StoredMessage]:
        """Every message of one segment, in row order."""
        try:
            data = self.root.read(self.root.path_of(uri))
            return _messages(pyarrow.ipc.open_file(pa.py_buffer(data)).read_all())
        except FileNotFoundError as e:
            raise ArchiveError(f"history segment not found: {uri}") from e
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ArchiveError(f"could not read history segment {uri}: {e}") from e

    def list_segments(self, shard: int) -> list[str]:
        directory = self.root.path("history", f"shard={shard}")
        self.root.fs.invalidate_cache(directory)
        try:
            paths = self.root.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return sorted(self.root.uri(p) for p in paths if p.endswith(".arrow") and not p.rsplit("/", 1)[-1].startswith("."))


async def archived_messages(
    js: JetStreamContext,
    archive: HistoryArchive | None,
    *,
    shard: int,
    tenant: str,
    project: str,
    execution_id: str,
    after_seq: int = 0,
    until_seq: int | None = None,
) -> tuple[ArchiveRef | None, list[StoredMessage]]:
    """The ref and the archived messages after ``after_seq`` (up to ``until_seq``), in seq order.

    (None, []) if nothing of the execution is archived. Only the parts that hold such seqs are read.
    """
    row = await ArchiveIndex(js, shard, archive.root if archive else None).get_row(
        execution_id, tenant=tenant, project=project
    )
    if row is None:
        return None, []
    ref = row.ref
    wanted = [p for p in ref.parts if p.last_seq > after_seq and (until_seq is None or p.first_seq <= until_seq)]
    if wanted and archive is None:
        raise ArchiveError(
            f"execution {execution_id} is archived, and this reader was given no object store to read it from"
        )
    messages: list[StoredMessage] = []
    for part in wanted:
        assert archive is not None
        messages += await asyncio.to_thread(archive.read_part, part)
    return ref, [m for m in messages if m.seq > after_seq and (until_seq is None or m.seq <= until_seq)]


class ArchiveReport(NamedTuple):
    executions: int
    messages: int
    segment: str | None
    unfolded: int = 0  # executions left for later: system/project had not folded their last events yet


def index_row(ex: ArchivedExecution, ref: ArchiveRef, before: IndexRow | None, *, shard_count: int) -> IndexRow:
    """The execution's index row: its projection folded from the archived history (onto the row before, if any)."""
    base = decode_projection(before.projection) if before is not None and before.status else None
    events = []
    for m in ex.messages:
        try:
            events.append(WalEvent(m.seq, decode_wal_message(m.subject, m.data, shard_count=shard_count)))
        except EnvelopeError:
            continue  # poison: skipped, as the pump and replay skip it
    projection = fold(base, events)
    if projection is None:  # nothing but poison: a row that says where the bytes are, and no projection
        return IndexRow(
            execution_id=ex.execution_id, tenant=ex.tenant, project=ex.project, status="", last_seq=ref.last_seq,
            event_count=0, projection="null", history=encode_ref(ref),
        )
    return IndexRow(
        execution_id=ex.execution_id, tenant=ex.tenant, project=ex.project, status=projection.status,
        last_seq=ref.last_seq, event_count=projection.event_count, projection=canonical(projection).decode(),
        history=encode_ref(ref), playbook=str((projection.playbook or {}).get("path") or ""),
        created_at=projection.created_at, updated_at=projection.updated_at,
    )


# The kernel's WAL consumers a purge must not disturb (system/cleanup, the archiver's caller, aside).
WAL_READERS = ("project", "orchestrate")


class Archiver:
    """Moves executions' histories from the WAL to the archive: write, verify, index, then purge.

    Crash-safe at every step: until the index row is recorded the WAL still
    holds everything (a segment written but not indexed is garbage, never
    read); once it is recorded, readers take the archive up to its last seq and
    the WAL after it, so the purges that follow (the WAL's messages, then the
    KV entry, a cache) change nothing they see; a re-run skips what is
    archived and purges what is left.
    """

    def __init__(
        self, js: JetStreamContext, *, shard: int, shard_count: int, archive: HistoryArchive, concurrency: int = 16,
        merge_grace_s: float | None = None,
    ) -> None:
        self.js = js
        self.shard = shard
        self.shard_count = shard_count
        self.archive = archive
        self.index = ArchiveIndex(js, shard, archive.root)
        self.concurrency = concurrency
        self.merge_grace_s = merge_grace_s
        self.faults: set[str] = set()  # fault injection points for crash tests (see system/cleanup)
        self._readers: asyncio.Future[dict[str, ConsumerInfo]] | None = None

    async def archive_executions(self, executions: Sequence[tuple[str, str, str]]) -> ArchiveReport:
        """Archive everything the WAL holds of each (tenant, project, execution id) beyond its archived part."""
        index = self.index
        gate = asyncio.Semaphore(self.concurrency)
        settled: list[tuple[str, int]] = []  # (execution id, archived last seq): KV entries that may go
        unfolded: list[str] = []

        async def pending(tenant: str, project: str, execution_id: str) -> tuple[ArchivedExecution, IndexRow | None] | None:
            async with gate:
                row = await index.get_row(execution_id)
                if row is not None and (row.tenant, row.project) != (tenant, project):
                    return None  # an id reused by another tenant/project: its events were dead-lettered, not folded
                ref = row.ref if row is not None else None
                messages = await read_stored(
                    self.js, shard=self.shard, tenant=tenant, project=project, execution_id=execution_id,
                    after_seq=ref.last_seq if ref else 0,
                )
                if ref is not None and ref.parts:
                    if await self._holds_archived(tenant, project, execution_id, ref.last_seq):
                        if not await self._purge_safe(ref.last_seq):
                            unfolded.append(execution_id)  # a kernel consumer holds some unacked: purge them later
                            return None
                        await self._purge(tenant, project, execution_id, ref.last_seq)  # a crash left archived events behind
                    if not messages:
                        settled.append((execution_id, ref.last_seq))  # and perhaps its KV entry
                if messages and (
                    await self._behind(execution_id, messages) or not await self._purge_safe(messages[-1].seq)
                ):
                    unfolded.append(execution_id)  # its KV entry would be written again after we drop it,
                    return None  # or a kernel consumer still holds some of its messages unacked
                return (ArchivedExecution(tenant, project, execution_id, messages), row) if messages else None

        self._readers = None  # the WAL consumers' positions, asked once per call (see _behind, _purge_safe)
        unique = list(dict.fromkeys(executions))
        found = [p for p in await asyncio.gather(*(pending(*x) for x in unique)) if p is not None]
        if not found:
            await self._drop_entries(settled, gate)
            return ArchiveReport(0, 0, None, len(unfolded))
        uri, parts = await asyncio.to_thread(self.archive.write_segment, self.shard, [f[0] for f in found])
        self._fault("after_write")
        await asyncio.to_thread(self.archive.verify_segment, uri, list(parts.values()))
        self._fault("after_verify")
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rows = []
        for ex, before in found:
            old = before.ref.parts if before is not None else ()
            ref = ArchiveRef(tenant=ex.tenant, project=ex.project, parts=(*old, parts[ex.execution_id]), archived_at=now)
            rows.append(index_row(ex, ref, before, shard_count=self.shard_count))
        await index.record(rows)
        self._fault("after_record")
        # The KV entries go before the WAL's messages: while the WAL still holds an execution's terminal
        # event, a crash here is redelivered and finishes the job; once purged, nothing would come back.
        await self._drop_entries([*settled, *((r.execution_id, r.last_seq) for r in rows)], gate)
        first, rest = found[0][0], [f[0] for f in found[1:]]
        await self._purge(first.tenant, first.project, first.execution_id, parts[first.execution_id].last_seq)
        self._fault("during_purge")

        async def purge(ex: ArchivedExecution) -> None:
            async with gate:
                await self._purge(ex.tenant, ex.project, ex.execution_id, parts[ex.execution_id].last_seq)

        await asyncio.gather(*(purge(ex) for ex in rest))
        if self.merge_grace_s is not None:
            await index.merge(grace_s=self.merge_grace_s)
        else:
            await index.merge()
        return ArchiveReport(len(found), sum(len(f[0].messages) for f in found), uri, len(unfolded))

    async def _behind(self, execution_id: str, messages: Sequence[StoredMessage]) -> bool:
        """Whether system/project may still write the execution's KV entry for what the archive is about to hold.

        With an entry: it has not folded the last event yet (poison aside). Without one: system/project has
        not acked the last event yet — a fold in flight that read no entry (and no index row, not recorded
        yet) would create the entry after the archiver dropped it, and nothing would drop it again.
        Without a system/project consumer (no kernel runs this shard, or the pump is re-creating it) the
        archive goes ahead: system/project checks the index again after creating an entry, and drops an
        entry that folded nothing past the archive (see its ``_archived_meanwhile``).
        """
        last = 0
        for m in messages:
            try:
                decode_wal_message(m.subject, m.data, shard_count=self.shard_count)
            except EnvelopeError:
                continue
            last = m.seq
        bucket = proj_bucket(self.shard)
        try:
            entry = await self.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{execution_id}", direct=True)
        except NotFoundError:
            floor = await self._project_ack_floor()
            return floor is not None and floor < last
        if entry.data is None:
            return False
        return entry_last_seq(entry.data) < last

    async def _project_ack_floor(self) -> int | None:
        """The WAL seq up to which system/project has acked everything (None: it has no consumer here)."""
        info = (await self._reader_positions()).get("project")
        if info is None:
            return None
        return info.ack_floor.stream_seq if info.ack_floor is not None else 0

    async def _reader_positions(self) -> dict[str, ConsumerInfo]:
        """The WAL consumers of :data:`WAL_READERS` that exist on this shard, by name (asked once per call)."""
        if self._readers is None:

            async def ask() -> dict[str, ConsumerInfo]:
                found = {}
                for name in WAL_READERS:
                    try:
                        found[name] = await self.js.consumer_info(wal_stream(self.shard), wal_consumer(name, self.shard))
                    except NotFoundError:
                        pass  # no kernel runs it here now: nothing of it to disturb
                return found

            self._readers = asyncio.ensure_future(ask())
        return await asyncio.shield(self._readers)

    async def _purge_safe(self, last: int) -> bool:
        """Whether purging WAL messages up to ``last`` leaves every kernel consumer's unacked messages alone.

        nats-server terminates a purged message that is delivered and not acked yet as if it were acked, and
        under AckAll (the WAL's pumps) that acks every message delivered before it, handled or not: a kernel
        that died then would start past them. Safe for a consumer that has acked past ``last``, or that holds
        nothing unacked and has either delivered past ``last`` or nothing left to deliver (its filter takes
        none of the rest). system/cleanup's own consumer is not asked: it calls this, with its batch.
        """
        for info in (await self._reader_positions()).values():
            if info.ack_floor is not None and info.ack_floor.stream_seq >= last:
                continue
            if info.num_ack_pending:
                return False
            delivered = info.delivered.stream_seq if info.delivered is not None else 0
            if delivered < last and info.num_pending:
                return False
        return True

    async def _drop_entries(self, settled: Sequence[tuple[str, int]], gate: asyncio.Semaphore) -> None:
        """Remove the KV entries (``proj_<shard>``) of archived executions: the index row holds their projection now.

        Removed without a marker (a purge of the key's subject, up to the revision read), and only when the
        entry folded nothing past the archive: a late event folded meanwhile keeps its entry.
        """

        async def drop(execution_id: str, last_seq: int) -> None:
            async with gate:
                await self.index.drop_entry(execution_id, last_seq)

        await asyncio.gather(*(drop(x, s) for x, s in settled))

    async def _holds_archived(self, tenant: str, project: str, execution_id: str, last_seq: int) -> bool:
        """Whether the WAL still holds a message of the execution at or below ``last_seq`` (one direct get)."""
        try:
            msg = await self.js.get_msg(
                wal_stream(self.shard), seq=1, next=True, subject=execution_filter(self.shard, tenant, project, execution_id),
                direct=True,
            )
        except NotFoundError:
            return False
        return msg.seq is not None and msg.seq <= last_seq

    async def _purge(self, tenant: str, project: str, execution_id: str, last_seq: int) -> None:
        # Purge the execution's subject up to and including last_seq: a late event after it stays.
        await self.js.purge_stream(
            wal_stream(self.shard), subject=execution_filter(self.shard, tenant, project, execution_id), seq=last_seq + 1
        )

    def _fault(self, point: str) -> None:
        if point in self.faults:
            os.kill(os.getpid(), signal.SIGKILL)
