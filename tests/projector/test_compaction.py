"""Compaction of projection segments against a real KV bucket and a file:// store."""

from __future__ import annotations

from pathlib import Path

import pyarrow.ipc
import pytest
from nats.js import JetStreamContext

from projector.cache import KvProjectionCache, Pointer, SegmentPointer
from projector.compaction import Compactor, compaction_settings, read_manifest
from projector.errors import ProjectorError
from projector.projection import Projection, canonical
from projector.snapshots import SegmentRow, SnapshotStore

SHARD = 1


def row(execution_id: int, last_seq: int, status: str = "COMPLETED") -> SegmentRow:
    p = Projection(execution_id=str(execution_id), tenant="acme", project="web", status=status, last_seq=last_seq,
                   event_count=last_seq)
    return SegmentRow(execution_id=str(execution_id), tenant="acme", project="web", status=status, last_seq=last_seq,
                      event_count=last_seq, projection=canonical(p).decode())


async def test_many_small_segments_become_one_sorted_indexed_segment(js: JetStreamContext, tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    cache = await KvProjectionCache.open(js, SHARD)
    # 20 batches, as materialize writes them: 30 executions, each written again in later batches with more events.
    newest: dict[int, SegmentRow] = {}
    pointed: dict[int, tuple[str, int]] = {}
    for batch in range(20):
        rows = [row(1000 + (batch * 7 + i) % 30, batch * 10 + i) for i in range(5)]
        uri = store.write_segment(SHARD, rows)
        for index, r in enumerate(rows):
            newest[int(r.execution_id)] = r
            pointed[int(r.execution_id)] = (uri, index)
    # The KV points each execution at its newest row, as materialize leaves it; one entry is inline.
    for x, (uri, index) in pointed.items():
        revision = await cache.put(str(x), Projection(execution_id=str(x), tenant="acme", project="web"), revision=None)
        if x != 1001:
            r = newest[x]
            await cache.put_pointer(str(x), Pointer(pointer=SegmentPointer(segment=uri, row=index), last_seq=r.last_seq,
                                                    status=r.status), revision=revision)
    inputs = store.list_segments(SHARD)
    assert len(inputs) == 20

    compactor = Compactor(store, min_segments=16, grace_s=3600)
    report = await compactor.compact(SHARD, cache)
    assert report is not None and report.segment is not None and report.inputs == 20 and report.rows == 30
    assert report.pointers_moved == 29  # every pointer but the inline entry's
    # The new segment: the newest row of each execution, sorted by execution id, readable by any Arrow tool.
    table = pyarrow.ipc.open_file(report.segment.removeprefix("file://")).read_all()
    assert table.column("execution_id").to_pylist() == [str(x) for x in sorted(newest)]
    assert table.column("last_seq").to_pylist() == [newest[x].last_seq for x in sorted(newest)]
    for x in newest:
        entry = await cache.get(str(x))
        assert entry is not None
        if x == 1001:
            assert entry.projection is not None  # inline entries are left alone
            continue
        assert entry.pointer is not None and entry.pointer.pointer.segment == report.segment
        assert store.read_row(report.segment, entry.pointer.pointer.row) == newest[x]
    manifest = read_manifest(store, SHARD)
    assert [s.segment for s in manifest.segments] == [report.segment]
    assert {s.segment for s in manifest.superseded} == set(inputs)
    # Superseded segments stay for the grace period, then go.
    assert len(store.list_segments(SHARD)) == 21
    assert await Compactor(store, min_segments=16, grace_s=3600).compact(SHARD, cache) is None
    report = await Compactor(store, min_segments=16, grace_s=0).compact(SHARD, cache)
    assert report is not None and report.deleted == 20 and report.segment is None
    assert store.list_segments(SHARD) == [manifest.segments[0].segment]
    assert read_manifest(store, SHARD).superseded == []


async def test_a_cold_point_read_of_a_compacted_shard_opens_one_file_and_one_batch(js: JetStreamContext, tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    cache = await KvProjectionCache.open(js, SHARD)
    # 3,000 executions over 60 small batches: several record batches per compacted segment.
    for batch in range(60):
        store.write_segment(SHARD, [row(5000 + batch * 50 + i, batch + 1) for i in range(50)])
    report = await Compactor(store, min_segments=16, grace_s=0).compact(SHARD, cache, force=True)
    assert report is not None and report.rows == 3000
    await Compactor(store, grace_s=0).compact(SHARD, cache)  # the grace is over: the inputs go
    assert len(store.list_segments(SHARD)) == 1
    for x in (5000, 6234, 7999):
        cold = SnapshotStore(f"file://{tmp_path}/objects")  # no KV entry: the manifest is the only index
        found = cold.find_row(SHARD, tenant="acme", project="web", execution_id=str(x))
        assert found is not None and found[2].execution_id == str(x)
        assert (cold.opened, cold.batches_read) == (1, 1)
        assert cold.read_row(found[0], found[1]) == found[2]
    absent = SnapshotStore(f"file://{tmp_path}/objects")
    assert absent.find_row(SHARD, tenant="acme", project="web", execution_id="4999") is None
    assert absent.opened == 0  # outside every segment's range: no file is opened at all
    assert absent.find_row(SHARD, tenant="other", project="web", execution_id="5000") is None


async def test_segments_written_after_a_compaction_are_found_first(js: JetStreamContext, tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    cache = await KvProjectionCache.open(js, SHARD)
    store.write_segment(SHARD, [row(42, 5, "RUNNING")])
    await Compactor(store, grace_s=0).compact(SHARD, cache, force=True)
    newer = store.write_segment(SHARD, [row(42, 9)])
    found = store.find_row(SHARD, tenant="acme", project="web", execution_id="42")
    assert found is not None and found[0] == newer and found[2].last_seq == 9
    # Folding everything together keeps the newest row.
    report = await Compactor(store, grace_s=0).compact(SHARD, cache, force=True)
    assert report is not None and report.inputs == 2 and report.rows == 1
    found = store.find_row(SHARD, tenant="acme", project="web", execution_id="42")
    assert found is not None and found[2].last_seq == 9 and found[0] == report.segment


def test_compaction_settings_are_checked() -> None:
    assert compaction_settings({"NOETL_COMPACT_SEGMENTS": "4", "NOETL_COMPACT_GRACE": "0"}) == (4, 0.0)
    for bad in ({"NOETL_COMPACT_SEGMENTS": "x"}, {"NOETL_COMPACT_SEGMENTS": "1"}, {"NOETL_COMPACT_GRACE": "-1"}):
        with pytest.raises(ProjectorError, match="NOETL_COMPACT"):
            compaction_settings(bad)


async def test_rows_of_archived_executions_are_left_out(js: JetStreamContext, tmp_path: Path) -> None:
    """Once system/cleanup archived an execution (its KV entry gone, its row in the archive's index), compaction
    drops its rows: the projection segments hold the retention window, not every execution ever run."""
    from projector.archiveindex import ArchiveIndex, IndexRow
    from projector.objects import ObjectRoot

    store = SnapshotStore(f"file://{tmp_path}/objects")
    cache = await KvProjectionCache.open(js, SHARD)
    for batch in range(4):
        store.write_segment(SHARD, [row(2000 + batch * 5 + i, 3) for i in range(5)])
    archived = {2000, 2001, 2002, 2007}
    for x in range(2000, 2019):  # 2019 has no KV entry either, but was never archived: its row stays
        if x not in archived:
            await cache.put(str(x), Projection(execution_id=str(x), tenant="acme", project="web", last_seq=3), revision=None)
    index = ArchiveIndex(js, SHARD, ObjectRoot(store.base_url))
    await index.record([IndexRow(**{f: getattr(row(x, 3), f) for f in SegmentRow.__struct_fields__}, history="{}")
                        for x in sorted(archived)])  # fmt: skip
    report = await Compactor(store, min_segments=2, grace_s=3600).compact(SHARD, cache, archive=index)
    assert report is not None and report.segment is not None and report.archived_dropped == len(archived)
    table = pyarrow.ipc.open_file(report.segment.removeprefix("file://")).read_all()
    assert table.column("execution_id").to_pylist() == [str(x) for x in range(2000, 2020) if x not in archived]
    assert report.rows == 20 - len(archived)
