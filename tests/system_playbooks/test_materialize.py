"""system/materialize against file:// and a real S3 endpoint; replay from a snapshot plus the WAL tail."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec.core
import pyarrow as pa
import pyarrow.ipc
import pytest
from nats.js import JetStreamContext

from kernel.host import consumer_stream, context_for, load_plugin, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from locator import new_event, shard_for
from locator.topology import Topology
from projector.cache import KvProjectionCache, ProjectionCache
from projector.errors import ReplayLimitExceeded
from projector.projection import canonical, decode_projection
from projector.replay import newest_snapshot, replay
from projector.snapshots import SnapshotStore
from system_playbooks.materialize.plugin import MaterializePlugin

SHARD = shard_for("acme", "web", "", 4)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStore:
    if request.param == "file":
        return SnapshotStore(f"file://{tmp_path}/objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return SnapshotStore(
        f"s3://noetl-test/{uuid.uuid4().hex}/objects",
        storage_options={"endpoint_url": endpoint, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}},
    )


def history(execution_id: str, *, finish: str | None) -> list[Any]:
    def ev(type: str, **kw: Any) -> Any:
        return new_event(tenant="acme", project="web", execution_id=execution_id, type=type, **kw)

    events = [
        ev("execution.requested", payload={"playbook": {"path": "demo/x", "version": 1}, "workload": {"n": 3}}),
        ev("execution.started"),
        ev("step.enter", step="a", attempt=1),
        ev("step.exit", step="a", attempt=1, payload={"result": {"rows": int(execution_id)}}),
        ev("user.note", payload={"text": "hi"}),
    ]
    if finish:
        events.append(ev(finish))
    return events


def pumps(js: JetStreamContext, cache: ProjectionCache, store: SnapshotStore, *, materialize: Any = None) -> list[Pump]:
    out = []
    for manifest in system_manifests():
        plugin = load_plugin(manifest)
        if manifest.consumer == "materialize" and materialize is not None:
            plugin = materialize
        ctx = context_for(manifest, SHARD, cache=cache, snapshots=store)
        out.append(Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=ctx, consumer=manifest.consumer, source=manifest.source,
                        max_batch=manifest.max_batch, linger=0.2, fetch_wait=0.2))
    return out


def caught_up(js: JetStreamContext) -> Any:
    async def done() -> bool:
        for consumer in ("project", "materialize"):
            try:
                info = await js.consumer_info(consumer_stream(consumer, SHARD), f"{consumer}_{SHARD}")
            except Exception:
                return False
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    return done


async def fresh(js: JetStreamContext, execution_id: str, **kw: Any) -> bytes:
    p = await replay(js, shard=SHARD, shard_count=4, tenant="acme", project="web", execution_id=execution_id, **kw)
    assert p is not None
    return canonical(p)


async def test_segments_pointers_and_replay(
    js: JetStreamContext, topology: Topology, store: SnapshotStore, pump_until: Any
) -> None:
    producer = Producer(js, topology)
    finished = {"101": "execution.completed", "102": "execution.failed", "103": "execution.cancelled"}
    running = ["104", "105"]
    for x, finish in finished.items():
        await producer.publish_many(history(x, finish=finish))
    for x in running:
        await producer.publish_many(history(x, finish=None))
    cache = await KvProjectionCache.open(js, SHARD)
    await pump_until(pumps(js, cache, store), caught_up(js))

    segments = store.list_segments(SHARD)
    assert segments
    # The segment is a plain Arrow IPC file: read it back with pyarrow alone.
    fs, path = fsspec.core.url_to_fs(segments[-1], **store.storage_options)
    with fs.open(path, "rb") as f:
        table = pyarrow.ipc.open_file(f).read_all()
    assert table.schema.field("last_seq").type == pa.uint64() and table.schema.field("event_count").type == pa.uint64()
    assert {"execution_id", "tenant", "project", "status", "projection"} <= set(table.column_names)
    assert set(table.column("execution_id").to_pylist()) == set(finished) | set(running)

    for x, finish in finished.items():
        entry = await cache.get(x)
        assert entry is not None and entry.pointer is not None, f"{x} should be a pointer once materialized"
        row = store.read_row(entry.pointer.pointer.segment, entry.pointer.pointer.row)
        assert row.execution_id == x and row.status == entry.pointer.status == finish.split(".")[1].upper()
        assert row.projection.encode() == await fresh(js, x)
    for x in running:
        entry = await cache.get(x)
        assert entry is not None and entry.projection is not None and entry.projection.status == "RUNNING"
        assert canonical(entry.projection) == await fresh(js, x)

    # New events after the snapshot: replay from snapshot + WAL tail equals the full fold.
    late = [new_event(tenant="acme", project="web", execution_id="101", type="user.late", payload={"i": i}) for i in range(3)]
    await producer.publish_many(late)
    base = await newest_snapshot(cache, store, "101")
    assert base is not None and base.event_count == 6
    from_snapshot = await replay(js, shard=SHARD, shard_count=4, tenant="acme", project="web", execution_id="101", base=base)
    assert from_snapshot is not None and from_snapshot.event_count == 9
    assert canonical(from_snapshot) == await fresh(js, "101")
    # And once the kernel folds them, the pointer is replaced by the full projection again.
    await pump_until(pumps(js, cache, store), caught_up(js))
    served = await newest_snapshot(cache, store, "101")
    assert served is not None and canonical(served) == await fresh(js, "101")


async def test_replay_is_bounded(js: JetStreamContext, topology: Topology) -> None:
    await Producer(js, topology).publish_many(history("200", finish="execution.completed"))
    with pytest.raises(ReplayLimitExceeded, match="would read 6 events, over the limit of 5"):
        await fresh(js, "200", limit=5)
    assert decode_projection(await fresh(js, "200", limit=6)).event_count == 6
    partial = decode_projection(await fresh(js, "200", until_seq=3))
    assert partial.last_seq == 3 and partial.event_count == 3
    assert await replay(js, shard=SHARD, shard_count=4, tenant="acme", project="web", execution_id="999") is None


class CrashBeforePointer(MaterializePlugin):
    """The segment is written, then the process 'dies' before any pointer update."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def handle(self, ctx: Any, events: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            real = ctx._cache.put_pointer

            async def boom(*args: Any, **kw: Any) -> int:
                ctx._cache.put_pointer = real
                raise RuntimeError("killed between segment write and pointer update")

            ctx._cache.put_pointer = boom
        await super().handle(ctx, events)


async def test_crash_between_segment_and_pointer_loses_nothing(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    await Producer(js, topology).publish_many(history("300", finish="execution.completed"))
    cache = await KvProjectionCache.open(js, SHARD)
    plugin = CrashBeforePointer()

    async def pointed() -> bool:
        entry = await cache.get("300")
        return entry is not None and entry.pointer is not None and await caught_up(js)()

    await pump_until(pumps(js, cache, store, materialize=plugin), pointed)
    assert plugin.calls >= 2 and len(store.list_segments(SHARD)) >= 2  # the redelivered batch redid the write
    served = await newest_snapshot(cache, store, "300")
    assert served is not None and canonical(served) == await fresh(js, "300")


async def test_it_consumes_the_projection_bucket_and_skips_a_value_that_is_no_projection(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    # system/materialize reads what system/project stored (KV_proj_<shard>), not the WAL: a value written
    # there by anyone else that is neither a projection nor a pointer is left out, and the shard goes on.
    from nats.js.api import ConsumerConfig
    from nats.js.errors import NotFoundError

    manifest = system_manifests(["materialize"])[0]
    assert manifest.source == "projections" and consumer_stream("materialize", SHARD) == f"KV_proj_{SHARD}"
    # The consumer an earlier version kept on the WAL is retired when the pump first subscribes.
    await js.add_consumer(f"WAL_{SHARD}", ConsumerConfig(durable_name=f"materialize_{SHARD}"))
    cache = await KvProjectionCache.open(js, SHARD)
    kv = await js.key_value(f"proj_{SHARD}")
    await kv.put("76", b"not json")
    await kv.put("77", b'{"execution_id":"77"}')  # JSON, but not a projection
    await Producer(js, topology).publish_many(history("78", finish="execution.completed"))
    store = SnapshotStore(f"file://{tmp_path}/objects")
    await pump_until(pumps(js, cache, store), caught_up(js))

    with pytest.raises(NotFoundError):
        await js.consumer_info(f"WAL_{SHARD}", f"materialize_{SHARD}")
    written = [x for segment in store.list_segments(SHARD) for x in store.read_segment(segment).column("execution_id").to_pylist()]
    assert written == ["78"]
    entry = await cache.get("78")
    assert entry is not None and entry.pointer is not None
    assert store.read_row(entry.pointer.pointer.segment, entry.pointer.pointer.row).projection.encode() == await fresh(js, "78")
    # Its own pointer write came back to it and wrote nothing: one segment.
    assert len(store.list_segments(SHARD)) == 1
    assert (await kv.get("76")).value == b"not json"  # left as it was


async def test_materialize_compacts_the_segments_it_writes(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projector.compaction import read_manifest

    monkeypatch.setenv("NOETL_COMPACT_SEGMENTS", "2")
    monkeypatch.setenv("NOETL_COMPACT_GRACE", "0")
    store = SnapshotStore(f"file://{tmp_path}/objects")
    cache = await KvProjectionCache.open(js, SHARD)
    producer = Producer(js, topology)
    finished = [str(300 + i) for i in range(4)]
    plugin = MaterializePlugin()  # one kernel's plug-in: it counts the segments it wrote
    for x in finished:  # one batch each: the pumps run between publishes, so materialize writes a segment each
        await producer.publish_many(history(x, finish="execution.completed"))
        await pump_until(pumps(js, cache, store, materialize=plugin), caught_up(js))
    manifest = read_manifest(store, SHARD)
    assert manifest.segments, "materialize never compacted"
    compacted = {s.segment for s in manifest.segments}
    # Every finished execution is served from the row its pointer names, equal to a fresh fold, and the
    # pointers of compacted rows were moved onto the compacted segment.
    moved = 0
    for x in finished:
        entry = await cache.get(x)
        assert entry is not None and entry.pointer is not None
        row = store.read_row(entry.pointer.pointer.segment, entry.pointer.pointer.row)
        assert row.execution_id == x and row.projection.encode() == await fresh(js, x)
        moved += entry.pointer.pointer.segment in compacted
    assert moved >= 2
    # Every file is a compacted segment or one superseded since the last check; those superseded by the first
    # compaction were deleted (grace 0) at the next one.
    files = set(store.list_segments(SHARD))
    assert files == compacted | {s.segment for s in manifest.superseded}
    assert len(manifest.superseded) < len(finished)


async def test_a_row_builder_that_fails_by_itself_fails_the_batch_instead_of_leaving_entries_out(
    js: JetStreamContext, tmp_path: Path
) -> None:
    # A compiled row builder that does not build (or traps) fails on every entry: that must redo the batch,
    # never be taken for entries that are no projections (left out and acked: lost for good).
    from projector.cache import ProjectionWrite
    from projector.fold import WalEvent, fold
    from system_playbooks.materialize.rows import RowError

    cache = await KvProjectionCache.open(js, SHARD)
    projection = fold(None, [WalEvent(i + 1, e) for i, e in enumerate(history("90", finish="execution.completed"))])
    assert projection is not None
    revision = await cache.put("90", projection, revision=None)
    store = SnapshotStore(f"file://{tmp_path}/objects")
    ctx = context_for(system_manifests(["materialize"])[0], SHARD, cache=cache, snapshots=store)

    def broken(table: pa.Table) -> pa.Table:
        raise RowError("cannot build rows.c: the toolchain is missing")

    alone = [ProjectionWrite(revision, "90", canonical(projection))]
    with_bad = [*alone, ProjectionWrite(revision + 1, "91", b"not json")]
    for writes in (alone, with_bad):
        with pytest.raises(RowError, match="cannot build"):
            await MaterializePlugin(rows=broken).handle(ctx, writes)
    assert store.list_segments(SHARD) == []
    entry = await cache.get("90")
    assert entry is not None and entry.projection is not None  # untouched

    await MaterializePlugin().handle(ctx, with_bad)  # a row builder that works: 91 is left out, 90 is written
    (segment,) = store.list_segments(SHARD)
    assert store.read_segment(segment).column("execution_id").to_pylist() == ["90"]
    entry = await cache.get("90")
    assert entry is not None and entry.pointer is not None
