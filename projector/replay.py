"""Bounded replay: rebuild one execution from its newest snapshot plus the WAL tail after it.

Reads only that execution's subject (direct gets, then for a long history an
ordered consumer, see :mod:`projector.walread`), the archive first when
system/cleanup moved it there, and refuses to read more than ``limit`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from nats.js import JetStreamContext

from locator.envelope import EnvelopeError, decode_wal_message
from locator.subjects import execution_filter, wal_stream
from projector.archive import HistoryArchive, archived_messages
from projector.walread import DIRECT_FIRST, read_subject
from projector.cache import CacheEntry, ProjectionCache
from projector.errors import ProjectorError, ReplayLimitExceeded
from projector.fold import WalEvent, fold
from projector.projection import Projection, decode_projection
from projector.snapshots import SnapshotStore

DEFAULT_LIMIT = 100_000
PROGRESS_EVERY = 1000


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
    total = len(archived)

    def pending(wal_read: int, left: int) -> None:
        nonlocal total
        if total <= len(archived):  # the first message the consumer delivered: now the size is known
            total = read + left + 1
            if total > limit:
                raise ReplayLimitExceeded(
                    f"replaying execution {execution_id} would read {total} events, over the "
                    f"limit of {limit}; materialize a snapshot first or raise the limit"
                )

    messages = read_subject(
        js, wal_stream(shard), execution_filter(shard, tenant, project, execution_id), after_seq=after_seq,
        until_seq=until_seq, idle_timeout=idle_timeout, on_pending=pending,
        # Past the limit the consumer takes over, whose first message says how long the history is.
        direct_first=max(0, min(DIRECT_FIRST, limit - len(archived))),
    )
    async with contextlib.aclosing(messages):
        async for m in messages:
            read += 1
            if read > limit:
                raise ReplayLimitExceeded(
                    f"replaying execution {execution_id} would read more than {limit} events; "
                    "materialize a snapshot first or raise the limit"
                )
            if progress is not None and (read == 1 or read % PROGRESS_EVERY == 0):
                progress(read, max(total, read))
            try:
                env = decode_wal_message(m.subject, m.data, shard_count=shard_count)
            except EnvelopeError:
                continue
            yield WalEvent(m.seq, env)
    if progress is not None and read:
        progress(read, read)


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
