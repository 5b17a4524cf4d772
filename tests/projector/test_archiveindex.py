"""The index of archived executions against a real KV bucket (its manifest) and a file:// store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pyarrow.ipc
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from projector.archiveindex import FANOUT, ArchiveIndex, ArchivePart, ArchiveRef, IndexRow, encode_ref, level_of
from projector.objects import ObjectRoot
from projector.projection import Projection, canonical

SHARD = 2


def row(execution_id: int, last_seq: int, *, tenant: str = "acme") -> IndexRow:
    p = Projection(execution_id=str(execution_id), tenant=tenant, project="web", status="COMPLETED", last_seq=last_seq,
                   event_count=last_seq)
    part = ArchivePart(segment="file:///nowhere.arrow", row=0, rows=last_seq, first_seq=1, last_seq=last_seq, digest="d")
    ref = ArchiveRef(tenant=tenant, project="web", parts=(part,), archived_at="2026-12-04T00:00:00.000Z")
    return IndexRow(execution_id=str(execution_id), tenant=tenant, project="web", status="COMPLETED", last_seq=last_seq,
                    event_count=last_seq, projection=canonical(p).decode(), history=encode_ref(ref))


async def test_a_point_read_opens_one_file_and_finds_rows_recorded_by_another_process(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    root = ObjectRoot(f"file://{tmp_path}/objects")
    writer = ArchiveIndex(js, SHARD, root)
    for batch in range(5):  # five cleanup batches of 300 executions: ids 1000-1299, 2000-2299, ...
        await writer.record([row(batch * 1000 + 1000 + n, 7) for n in range(300)])
    assert len((await writer.manifest(newer_than=time.monotonic())).segments) == 5

    # Another process: its own connection, its own copy of the manifest.
    other = await nats.connect(nats_server.url)
    try:
        reader = ArchiveIndex(other.jetstream(), SHARD, root)
        found = await reader.get_row("3123")
        assert found is not None and found.execution_id == "3123" and found.ref.last_seq == 7
        assert reader.opened == 1  # one index file opened, the one whose batch ranges hold the id
        assert await reader.get_row("3123", tenant="zeta", project="web") is None  # another tenant's id: no match
        assert await reader.get_row("999") is None and await reader.get_row("not-a-snowflake") is None
        # Recorded after the reader cached its manifest: a miss asks for the manifest again and finds it.
        await writer.record([row(9000, 3)])
        assert (await reader.get_row("9000")) is not None
    finally:
        await other.close()

    # Any Arrow tool reads an index segment: the Feather segment contract's columns, sorted by id.
    segment = (await writer.manifest()).segments[0].segment
    table = pyarrow.ipc.open_file(segment.removeprefix("file://")).read_all()
    assert {"execution_id", "tenant", "project", "status", "last_seq", "event_count", "projection"} <= set(
        table.column_names
    )
    ids = [int(x) for x in table.column("execution_id").to_pylist()]
    assert ids == sorted(ids)


async def test_merging_keeps_the_newest_row_and_the_segment_count_bounded(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    root = ObjectRoot(f"file://{tmp_path}/objects")
    index = ArchiveIndex(js, SHARD, root)
    other = await nats.connect(nats_server.url)
    try:
        stale = ArchiveIndex(other.jetstream(), SHARD, root, max_age_s=3600)  # keeps the manifest it read
        await index.record([row(5, 4)])
        merges = 0
        for n in range(1, 200):  # 200 cleanup batches of 3 executions; execution 5 archived again with more events
            await index.record([row(10 + 3 * n + k, 2) for k in range(3)] + ([row(5, 9)] if n == 100 else []))
            merges += await index.merge(grace_s=0.0) > 0
            if n == 50:
                await stale.manifest(newer_than=time.monotonic())
        manifest = await index.manifest(newer_than=time.monotonic())
        assert merges > 0
        # Size-tiered: at most FANOUT segments a level, whatever the number of batches recorded.
        levels = {s.level for s in manifest.segments}
        assert all(sum(s.level == lv for s in manifest.segments) <= FANOUT for lv in levels)
        assert len(manifest.segments) < 3 * FANOUT
        # Each execution once, but 5 twice until its two rows meet in one merge.
        assert manifest.rows in (1 + 3 * 199, 2 + 3 * 199)
        newest = await index.get_row("5")
        assert newest is not None and newest.last_seq == 9  # the second archive of 5 wins over the first
        fresh = await ArchiveIndex(js, SHARD, root, max_age_s=0).get_row("5")
        assert fresh is not None and fresh.last_seq == 9
        # Merged inputs are deleted (grace 0): the files are the manifest's.
        await index.merge(grace_s=0.0)
        files = {p.name for p in (tmp_path / "objects" / "history" / f"shard={SHARD}" / "index").iterdir()}
        assert files == {s.segment.rsplit("/", 1)[-1] for s in (await index.manifest(newer_than=time.monotonic())).segments}
        # The stale reader's manifest names files merged and deleted since: it reads the manifest again.
        old = await stale.manifest()
        assert not {s.segment for s in old.segments} <= {s.segment for s in manifest.segments}
        found = await stale.get_row(str(10 + 3 * 49))
        assert found is not None and found.last_seq == 2
    finally:
        await other.close()


async def test_concurrent_writers_both_land(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    """The manifest is written compare-and-set: two writers at once (a kernel and an operator's archive --now)."""
    root = ObjectRoot(f"file://{tmp_path}/objects")
    other = await nats.connect(nats_server.url)
    try:
        a, b = ArchiveIndex(js, SHARD, root), ArchiveIndex(other.jetstream(), SHARD, root)
        await asyncio.gather(*(w.record([row(100 * i + k, 1) for k in range(5)]) for i, w in enumerate([a, b] * 4)))
        manifest = await a.manifest(newer_than=time.monotonic())
        assert len(manifest.segments) == 8 and manifest.rows == 40
        for i in range(8):
            assert await b.get_row(str(100 * i + 4)) is not None
    finally:
        await other.close()


def test_levels() -> None:
    assert [level_of(n) for n in (0, 1, FANOUT - 1, FANOUT, FANOUT**2 - 1, FANOUT**2)] == [0, 0, 0, 1, 1, 2]
