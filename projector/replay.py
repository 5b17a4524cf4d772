"""Bounded replay: rebuild one execution from its newest snapshot plus the WAL tail after it.

Reads only that execution's subject (an ordered consumer with a subject
filter and a start sequence) and refuses to read more than ``limit`` events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from locator.envelope import EnvelopeError, decode_wal_message
from locator.subjects import execution_filter, wal_stream
from projector.archive import HistoryArchive, archived_messages
from projector.cache import CacheEntry, ProjectionCache
from projector.errors import ProjectorError, ReplayLimitExceeded
from projector.fold import WalEvent, fold
from projector.projection import Projection, decode_projection
from projector.snapshots import SnapshotStore

DEFAULT_LIMIT = 100_000
PROGRESS_EVERY = 1000


def _position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, messages pending) of a JetStream message, read straight off its reply subject.

    The same tokens ``msg.metadata`` reads (both the plain and the domain form), without building its
    dataclasses and timestamp for every message of a long history; anything else goes through
    ``msg.metadata`` (and its error).

    >>> from nats.aio.msg import Msg
    >>> plain = "$JS.ACK.WAL_0.c1.1.4071.17.1763800000000000000.23"
    >>> domain = "$JS.ACK.hub.ACCHASH.WAL_0.c1.1.4071.17.1763800000000000000.23.x7"
    >>> [_position(Msg(None, reply=r)) for r in (plain, domain)]
    [(4071, 23), (4071, 23)]
    >>> all((m.sequence.stream, m.num_pending) == (4071, 23) for m in map(Msg.Metadata._from_reply, (plain, domain)))
    True
    """
    tokens = msg.reply.split(".")
    n = len(tokens)
    if tokens[0] == "$JS" and n > 1 and tokens[1] == "ACK":
        if n == 9:
            return int(tokens[5]), int(tokens[8])
        if n >= 11:
            return int(tokens[7]), int(tokens[10])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending


async def history(
    js: JetStreamContext,
    *,
    shard: int,
    shard_count: int,
    tenant: str,
    project: str,
    execution_id: str,
    after_seq: int = 0,
    limit: int = DEFAULT_LIMIT,
    until_seq: int | None = None,
    idle_timeout: float = 5.0,
    progress: Callable[[int, int], None] | None = None,
    archive: HistoryArchive | None = None,
) -> AsyncGenerator[WalEvent, None]:
    """The execution's events after ``after_seq`` in WAL order, poison skipped (as the pump skips it).

    Across tiers: what ``system/cleanup`` archived is read from ``archive`` first, then the WAL after the
    archive's last seq (an archived execution read without ``archive`` raises :class:`ArchiveError`).
    ``progress(read, total)`` is called on the first message, every :data:`PROGRESS_EVERY` messages and
    on the last; ``total`` is how many messages of the execution the tiers held when reading began.
    """
    ref, archived = await archived_messages(
        js, archive, shard=shard, tenant=tenant, project=project, execution_id=execution_id,
        after_seq=after_seq, until_seq=until_seq,
    )
    read = 0
    if archived:
        if len(archived) > limit:
            raise ReplayLimitExceeded(
                f"replaying execution {execution_id} would read {len(archived)} archived events, over the "
                f"limit of {limit}; raise the limit"
            )
        for m in archived:
            read += 1
            if progress is not None and (read == 1 or read % PROGRESS_EVERY == 0):
                progress(read, len(archived))
            try:
                env = decode_wal_message(m.subject, m.data, shard_count=shard_count)
            except EnvelopeError:
                continue
            yield WalEvent(m.seq, env)
    if ref is not None:
        after_seq = max(after_seq, ref.last_seq)
    stream = wal_stream(shard)
    subject = execution_filter(shard, tenant, project, execution_id)
    try:
        first = await js.get_msg(stream, seq=after_seq + 1, next=True, subject=subject)
    except NotFoundError:
        return
    assert first.seq is not None
    if until_seq is not None and first.seq > until_seq:
        return
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first.seq)
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config, inactive_threshold=30.0)
    try:
        wal_read = total = 0
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except nats.errors.TimeoutError as e:
                raise ProjectorError(f"replay of {execution_id} stalled: no message for {idle_timeout}s") from e
            seq, pending = _position(msg)
            if until_seq is not None and seq > until_seq:
                return
            wal_read += 1
            read += 1
            if wal_read == 1:
                total = len(archived) + pending + 1
                if total > limit:
                    raise ReplayLimitExceeded(
                        f"replaying execution {execution_id} would read {total} events, over the "
                        f"limit of {limit}; materialize a snapshot first or raise the limit"
                    )
            if progress is not None and (wal_read == 1 or read % PROGRESS_EVERY == 0 or pending == 0):
                progress(read, max(total, read))
            try:
                env = decode_wal_message(msg.subject, msg.data or b"", shard_count=shard_count)
            except EnvelopeError:
                pass
            else:
                yield WalEvent(seq, env)
            if pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def replay(
    js: JetStreamContext,
    *,
    shard: int,
    shard_count: int,
    tenant: str,
    project: str,
    execution_id: str,
    base: Projection | None = None,
    limit: int = DEFAULT_LIMIT,
    until_seq: int | None = None,
    archive: HistoryArchive | None = None,
) -> Projection | None:
    """``fold(base, events after base.last_seq)``; None if the execution has no events at all."""
    events = [
        e
        async for e in history(
            js,
            shard=shard,
            shard_count=shard_count,
            tenant=tenant,
            project=project,
            execution_id=execution_id,
            after_seq=base.last_seq if base else 0,
            limit=limit,
            until_seq=until_seq,
            archive=archive,
        )
    ]
    return fold(base, events)


async def newest_snapshot(cache: ProjectionCache, snapshots: SnapshotStore, execution_id: str) -> Projection | None:
    """The projection the cache holds or points at (the snapshot a replay starts from)."""
    return await entry_projection(await cache.get(execution_id), snapshots)


async def entry_projection(entry: CacheEntry | None, snapshots: SnapshotStore) -> Projection | None:
    """The projection a cache entry stands for: inline, or read back from its Feather segment row."""
    if entry is None:
        return None
    if entry.projection is not None:
        return entry.projection
    assert entry.pointer is not None
    row = await asyncio.to_thread(snapshots.read_row, entry.pointer.pointer.segment, entry.pointer.pointer.row)
    return decode_projection(row.projection)
