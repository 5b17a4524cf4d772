"""One contract suite for SnapshotStore, run against a file:// directory and a real S3 HTTP endpoint (moto)."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec.core
import pyarrow as pa
import pyarrow.feather
import pyarrow.ipc
import pytest

from projector import snapshots
from projector.errors import ProjectorError
from projector.snapshots import SegmentRow, SnapshotError, SnapshotStore

BUCKET = "noetl-test"
CREDENTIALS = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}

EXPECTED_TYPES = {
    "execution_id": pa.string(),
    "tenant": pa.string(),
    "project": pa.string(),
    "status": pa.string(),
    "last_seq": pa.uint64(),
    "event_count": pa.uint64(),
}


def s3_store(endpoint: str) -> SnapshotStore:
    # A fresh prefix per test keeps tests independent on the shared server.
    return SnapshotStore(
        f"s3://{BUCKET}/{uuid.uuid4().hex}/objects", storage_options={"endpoint_url": endpoint, **CREDENTIALS}
    )


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStore:
    if request.param == "file":
        return SnapshotStore(f"file://{tmp_path}/objects")
    return s3_store(request.getfixturevalue("s3_endpoint"))


def make_rows(n: int, *, prefix: str = "exec") -> list[SegmentRow]:
    return [
        SegmentRow(
            execution_id=f"{prefix}-{i}",
            tenant=f"tenant-{i % 3}",
            project="etl",
            status="COMPLETED" if i % 2 else "FAILED",
            last_seq=2**63 + i,  # above int64: only uint64 holds it
            event_count=i + 1,
            projection=json.dumps({"execution_id": f"{prefix}-{i}", "steps": {"a": i}}, sort_keys=True),
        )
        for i in range(n)
    ]


def fetch(store: SnapshotStore, uri: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(uri, **store.storage_options)
    data = fs.cat_file(path)
    assert isinstance(data, bytes)
    return data


# --- contract ---------------------------------------------------------------------------------


def test_round_trip_with_plain_pyarrow(store: SnapshotStore) -> None:
    rows = make_rows(300)  # more than one record batch
    uri = store.write_segment(2, rows)
    assert uri.startswith(store.base_url + "/segments/shard=2/")
    assert uri.endswith(".feather")

    data = fetch(store, uri)
    with pyarrow.ipc.open_file(pa.BufferReader(data)) as reader:
        table = reader.read_all()
    assert table.column_names == [
        "execution_id", "tenant", "project", "status", "last_seq", "event_count", "projection"
    ]
    for name, type_ in EXPECTED_TYPES.items():
        assert table.schema.field(name).type == type_
    assert table.schema.field("projection").type in (pa.string(), pa.large_string())
    assert table.to_pylist() == [{f: getattr(r, f) for f in table.column_names} for r in rows]
    assert pyarrow.feather.read_table(pa.BufferReader(data)).equals(table)
    assert store.read_segment(uri).equals(table)


def test_read_row_first_middle_last(store: SnapshotStore) -> None:
    rows = make_rows(300)
    uri = store.write_segment(0, rows)
    for i in (0, 127, 128, 150, 299):
        assert store.read_row(uri, i) == rows[i]


def test_read_row_out_of_range(store: SnapshotStore) -> None:
    uri = store.write_segment(0, make_rows(5))
    for bad in (5, 128, -1):
        with pytest.raises(SnapshotError, match=rf"row {bad} is out of range"):
            store.read_row(uri, bad)


def test_missing_segment(store: SnapshotStore) -> None:
    uri = store.write_segment(1, make_rows(1))
    store.delete(uri)
    with pytest.raises(SnapshotError, match="segment not found"):
        store.read_row(uri, 0)
    with pytest.raises(SnapshotError, match="segment not found"):
        store.read_segment(uri)


def test_snapshot_error_is_a_projector_error() -> None:
    assert issubclass(SnapshotError, ProjectorError)


def test_empty_rows_refused(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotError, match="empty"):
        store.write_segment(0, [])
    assert store.list_segments(0) == []


def test_rows_outside_the_schema_refused(store: SnapshotStore) -> None:
    bad = SegmentRow(
        execution_id="e", tenant="t", project="p", status="COMPLETED", last_seq=-1, event_count=1, projection="{}"
    )
    with pytest.raises(SnapshotError, match="schema"):
        store.write_segment(0, [bad])
    assert store.list_segments(0) == []


def test_list_segments_ordering_and_shards(store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    ticks = iter(range(100))
    monkeypatch.setattr(snapshots, "_utcnow", lambda: start + timedelta(milliseconds=next(ticks) * 7))

    assert store.list_segments(0) == []
    shard0 = [store.write_segment(0, make_rows(1, prefix=f"s0-{i}")) for i in range(4)]
    shard1 = [store.write_segment(1, make_rows(1, prefix="s1"))]

    assert shard0[0].rsplit("/", 1)[-1].startswith("20260102T030405.006Z-")
    assert store.list_segments(0) == shard0
    assert store.list_segments(1) == shard1
    assert store.list_segments(7) == []


def test_delete(store: SnapshotStore) -> None:
    keep = store.write_segment(3, make_rows(1, prefix="keep"))
    gone = store.write_segment(3, make_rows(1, prefix="gone"))
    store.delete(gone)
    assert store.list_segments(3) == [keep]
    store.delete(gone)  # already gone: retries are safe
    assert store.read_row(keep, 0).execution_id == "keep-0"


def test_delete_refuses_foreign_paths(store: SnapshotStore) -> None:
    uri = store.write_segment(0, make_rows(1))
    with pytest.raises(SnapshotError, match="not a segment"):
        store.delete(store.base_url + "/other/file.feather")
    with pytest.raises(SnapshotError, match="not on this store's filesystem"):
        store.delete("memory://" + uri.split("://", 1)[1])
    assert store.list_segments(0) == [uri]


def test_zstd_compression_is_used(store: SnapshotStore) -> None:
    projection = json.dumps({"blob": "abcdefgh" * (2**20 // 8)})
    row = SegmentRow(
        execution_id="big", tenant="t", project="p", status="COMPLETED", last_seq=1, event_count=1,
        projection=projection,
    )
    uri = store.write_segment(0, [row])
    data = fetch(store, uri)
    assert len(data) < 64 * 1024
    assert b"\x28\xb5\x2f\xfd" in data  # zstd frame magic (lz4 would be 04 22 4d 18)
    assert store.read_row(uri, 0).projection == projection


def test_reads_a_segment_written_by_another_tool(store: SnapshotStore) -> None:
    # No batch-size metadata and uneven batches: read_row walks the batches.
    rows = make_rows(10)
    own = store.read_segment(store.write_segment(0, rows)).replace_schema_metadata(None)
    sink = io.BytesIO()
    pyarrow.feather.write_feather(own, sink, compression="zstd", chunksize=3)
    uri = store.base_url + "/segments/shard=0/foreign.feather"
    fs, path = fsspec.core.url_to_fs(uri, **store.storage_options)
    fs.pipe_file(path, sink.getvalue())
    assert [store.read_row(uri, i) for i in range(10)] == rows
    with pytest.raises(SnapshotError, match="out of range"):
        store.read_row(uri, 10)
    assert "foreign.feather" not in "".join(store.list_segments(0))


# --- from_env ---------------------------------------------------------------------------------


def test_from_env_default_is_file_under_data_dir(tmp_path: Path) -> None:
    store = SnapshotStore.from_env(data_dir=tmp_path / "data", env={})
    assert store.base_url == f"file://{tmp_path}/data/objects"
    uri = store.write_segment(0, make_rows(1))
    assert uri.startswith(f"file://{tmp_path}/data/objects/segments/shard=0/")
    assert (tmp_path / "data" / "objects" / "segments" / "shard=0").is_dir()


def test_from_env_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOETL_OBJECTS_URL", f"file://{tmp_path}/elsewhere")
    store = SnapshotStore.from_env(data_dir=tmp_path / "data")
    assert store.base_url == f"file://{tmp_path}/elsewhere"


def test_from_env_s3(tmp_path: Path, s3_endpoint: str) -> None:
    env = {
        "NOETL_OBJECTS_URL": f"s3://{BUCKET}/{uuid.uuid4().hex}/objects",
        "NOETL_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    store = SnapshotStore.from_env(data_dir=tmp_path, env=env)
    rows = make_rows(2)
    uri = store.write_segment(5, rows)
    assert uri.startswith(env["NOETL_OBJECTS_URL"] + "/segments/shard=5/")
    assert store.list_segments(5) == [uri]
    assert store.read_row(uri, 1) == rows[1]
    assert not (tmp_path / "objects").exists()


# --- file:// atomicity --------------------------------------------------------------------------


def test_interrupted_encoding_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    real_new_file = pyarrow.ipc.new_file

    class FailingWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real_new_file(*args, **kwargs)
            self._written = 0

        def __enter__(self) -> FailingWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self._inner.close()

        def write_batch(self, batch: pa.RecordBatch) -> None:
            if self._written == 1:
                raise OSError("disk full")
            self._inner.write_batch(batch)
            self._written += 1

    monkeypatch.setattr(pyarrow.ipc, "new_file", FailingWriter)
    with pytest.raises(SnapshotError, match="disk full"):
        store.write_segment(0, make_rows(300))
    assert store.list_segments(0) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_interrupted_file_write_leaves_no_visible_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    kept = store.write_segment(0, make_rows(1))
    seen: list[str] = []

    def failing_fsync(fd: int) -> None:
        # The temp file holds the bytes by now; the crash comes before the rename.
        seen.extend(p.name for p in (tmp_path / "objects/segments/shard=0").iterdir())
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SnapshotError, match="I/O error"):
        store.write_segment(0, make_rows(300))
    monkeypatch.undo()

    temp_names = [n for n in seen if n.startswith(".") and n.endswith(".tmp")]
    assert len(temp_names) == 1
    assert store.list_segments(0) == [kept]
    assert sorted(p.name for p in (tmp_path / "objects/segments/shard=0").iterdir()) == [kept.rsplit("/", 1)[-1]]


def test_list_segments_ignores_leftover_temp_files(tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    uri = store.write_segment(0, make_rows(1))
    name = uri.rsplit("/", 1)[-1]
    (tmp_path / "objects/segments/shard=0" / f".{name}.tmp").write_bytes(b"half a segm")
    assert store.list_segments(0) == [uri]


def test_negative_shard_refused(tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    with pytest.raises(SnapshotError, match="shard"):
        store.list_segments(-1)
