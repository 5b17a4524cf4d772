"""Projection on demand: warm KV -> Feather snapshot (or the archive's index) -> bounded replay from the WAL."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import msgspec
import nats.errors
from nats.js.errors import NotFoundError
from opentelemetry import trace

from edge.cells import CellClients
from edge.errors import EdgeError, GatewayTimeout, NotFound, Unavailable, Unprocessable, unknown_execution
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream
from projector.archive import ArchiveError, ArchiveIndex, HistoryArchive
from projector.errors import ReplayLimitExceeded
from projector.projection import Projection, decode_projection
from projector.replay import entry_projection, replay
from projector.snapshots import SnapshotError, SnapshotStore

tracer = trace.get_tracer("noetl.edge.read")
Source = Literal["cache", "snapshot", "replay"]


class ReadResult(msgspec.Struct, frozen=True):
    projection: Projection
    source: Source


class ReadPath:
    """Serves one execution's projection from the cheapest place that has it."""

    def __init__(
        self,
        cells: CellClients,
        snapshots: SnapshotStore,
        *,
        replay_limit: int = 100_000,
        min_seq_wait: float = 5.0,
        snapshot_scan: int = 32,
    ) -> None:
        self.cells = cells
        self.snapshots = snapshots
        self.replay_limit = replay_limit
        self.min_seq_wait = min_seq_wait
        self.snapshot_scan = snapshot_scan
        self.archive = HistoryArchive.at(snapshots.base_url, storage_options=snapshots.storage_options)

    async def _replay(
        self, shard: int, tenant: str, project: str, execution_id: str, *, base: Projection | None, until: int | None
    ) -> Projection | None:
        js = await self.cells.js_for_shard(shard)
        with tracer.start_as_current_span("edge.read.replay", attributes={"noetl.execution_id": execution_id}):
            try:
                return await replay(
                    js,
                    shard=shard,
                    shard_count=self.cells.topology.shard_count,
                    tenant=tenant,
                    project=project,
                    execution_id=execution_id,
                    base=base,
                    limit=self.replay_limit,
                    until_seq=until,
                    archive=self.archive,
                )
            except ReplayLimitExceeded as e:
                raise Unprocessable(str(e)) from e

    async def _archived(self, shard: int, tenant: str, project: str, execution_id: str) -> Projection | None:
        """The projection system/cleanup left in the archive's index (its KV entry went when it was archived)."""
        js = await self.cells.js_for_shard(shard)
        try:
            row = await ArchiveIndex(js, shard, self.archive.root).get_row(execution_id, tenant=tenant, project=project)
        except ArchiveError as e:
            raise Unavailable(f"the archive of shard {shard} could not be read: {e}", headers={"Retry-After": "2"}) from e
        return None if row is None or not row.status else decode_projection(row.projection)

    async def exists(self, shard: int, tenant: str, project: str, execution_id: str) -> bool:
        """Whether ``execution_id`` is ``tenant``/``project``'s on ``shard``: an event of it was ever stored.

        Remembered once true (an execution is never unmade: its history moves to the archive at most), so
        ``POST …/events`` asks NATS only the first time it meets an execution.
        """
        mirror = await self.cells.mirror_for_shard(shard)
        if mirror is not None and mirror.knows(execution_id, tenant, project):
            return True
        found = await self._exists(shard, tenant, project, execution_id)
        if found and mirror is not None:
            mirror.remember(execution_id, tenant, project)
        return found

    async def remember(self, shard: int, tenant: str, project: str, execution_id: str) -> None:
        """Note an execution this edge has just started (its ``execution.requested`` is acked)."""
        mirror = await self.cells.mirror_for_shard(shard)
        if mirror is not None:
            mirror.remember(execution_id, tenant, project)

    async def _exists(self, shard: int, tenant: str, project: str, execution_id: str) -> bool:
        js = await self.cells.js_for_shard(shard)
        with contextlib.suppress(EdgeError):
            # The KV key is the execution id alone: an entry proves existence only if it is this tenant's and
            # project's (a pointer does not say whose it is, so the WAL below decides).
            if await (await self.cells.cache_for_shard(shard)).owner(execution_id) == (tenant, project):
                return True
        try:
            await js.get_msg(wal_stream(shard), seq=1, next=True, subject=execution_filter(shard, tenant, project, execution_id))
        except NotFoundError:  # no event of this execution in the WAL (a timeout is not "unknown": it is a 503)
            # or its history was moved to the archive
            row = await ArchiveIndex(js, shard, self.archive.root).get_row(execution_id, tenant=tenant, project=project)
            return row is not None
        return True

    async def _stored(self, shard: int, tenant: str, project: str, execution_id: str) -> ReadResult | None:
        with tracer.start_as_current_span("edge.read.cache", attributes={"noetl.execution_id": execution_id}):
            mirror = await self.cells.mirror_for_shard(shard)
            if mirror is not None:
                entry = await mirror.get(execution_id)
            else:
                entry = await (await self.cells.cache_for_shard(shard)).get(execution_id)
        if entry is not None and entry.projection is not None:
            if (entry.projection.tenant, entry.projection.project) == (tenant, project):
                return ReadResult(entry.projection, "cache")
            return None  # the id belongs to another tenant/project on this shard
        with tracer.start_as_current_span("edge.read.snapshot", attributes={"noetl.execution_id": execution_id}):
            try:
                if entry is not None:
                    p = await entry_projection(entry, self.snapshots)
                elif (archived := await self._archived(shard, tenant, project, execution_id)) is not None:
                    p = archived
                else:
                    found = await asyncio.to_thread(
                        self.snapshots.find,
                        shard,
                        tenant=tenant,
                        project=project,
                        execution_id=execution_id,
                        max_segments=self.snapshot_scan,
                    )
                    if found is None:
                        return None
                    row = await asyncio.to_thread(self.snapshots.read_row, *found)
                    p = decode_projection(row.projection)
            except SnapshotError:
                return None  # the snapshot is gone: fall through to replay
        if p is None or (p.tenant, p.project) != (tenant, project):
            return None
        return ReadResult(p, "snapshot")

    async def read(
        self,
        tenant: str,
        project: str,
        affinity: str,
        execution_id: str,
        *,
        min_seq: int | None = None,
        as_of_seq: int | None = None,
    ) -> ReadResult:
        shard = shard_for(tenant, project, affinity, self.cells.topology.shard_count)
        try:
            return await self._read(shard, tenant, project, affinity, execution_id, min_seq, as_of_seq)
        except (nats.errors.Error, asyncio.TimeoutError, ConnectionError) as e:
            raise Unavailable(f"NATS did not answer for shard {shard}: {e!r}", headers={"Retry-After": "2"}) from e

    async def _read(
        self, shard: int, tenant: str, project: str, affinity: str, execution_id: str, min_seq: int | None,
        as_of_seq: int | None,
    ) -> ReadResult:
        if as_of_seq is not None:
            p = await self._replay(shard, tenant, project, execution_id, base=None, until=as_of_seq)
            if p is None:
                raise NotFound(f"execution {execution_id} of {tenant}/{project} has no events up to seq {as_of_seq}")
            return ReadResult(p, "replay")
        result = await self._stored(shard, tenant, project, execution_id)
        if result is None:
            p = await self._replay(shard, tenant, project, execution_id, base=None, until=None)
            if p is None:
                raise unknown_execution(execution_id, tenant, project, affinity)
            result = ReadResult(p, "replay")
        elif result.source == "snapshot":
            # A snapshot may be older than the WAL (the kernel replaces a pointer only when it folds
            # newer events, and a segment found by scanning has no KV entry at all): add the tail.
            tail = await self._replay(shard, tenant, project, execution_id, base=result.projection, until=None)
            if tail is not None and tail.last_seq > result.projection.last_seq:
                result = ReadResult(tail, "replay")
        if min_seq is None or result.projection.last_seq >= min_seq:
            return result
        # Read-your-writes: fold the WAL tail ourselves rather than wait for the kernel; wait only
        # while the event is not in the WAL yet, and no longer than the bound.
        deadline = asyncio.get_running_loop().time() + self.min_seq_wait
        p = result.projection
        while True:
            tail = await self._replay(shard, tenant, project, execution_id, base=p, until=None)
            if tail is not None and tail.last_seq > p.last_seq:
                p = tail
            if p.last_seq >= min_seq:
                return ReadResult(p, "replay" if p is not result.projection else result.source)
            if asyncio.get_running_loop().time() >= deadline:
                js = await self.cells.js_for_shard(shard)
                last = (await js.stream_info(wal_stream(shard))).state.last_seq
                raise GatewayTimeout(
                    f"execution {execution_id} has last_seq {p.last_seq} < min_seq {min_seq} after waiting "
                    f"{self.min_seq_wait:g}s (the shard's WAL is at seq {last})",
                    headers={"Retry-After": "1"},
                    last_seq=p.last_seq,
                    min_seq=min_seq,
                )
            await asyncio.sleep(0.05)
