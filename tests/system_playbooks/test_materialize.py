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

from kernel.host import context_for, load_plugin, system_manifests
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
        out.append(Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=ctx, consumer=manifest.consumer,
                        max_batch=manifest.max_batch, linger=0.2, fetch_wait=0.2))
    return out


def caught_up(js: JetStreamContext) -> Any:
    async def done() -> bool:
        for consumer in ("project", "materialize"):
            try:
                info = await js.consumer_info(f"WAL_{SHARD}", f"{consumer}_{SHARD}")
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


async def test_a_batch_whose_projection_never_catches_up_goes_on_after_a_few_tries(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    # system/project folded the first event but dead-lettered the second (say, refused): the KV entry never
    # reaches the batch's last seq. Materialize waits a few tries, then goes on instead of stalling its shard.
    from nats.js.errors import NotFoundError

    from projector.fold import WalEvent, fold

    events = history("77", finish=None)[:2]
    producer = Producer(js, topology)
    acks = [await producer.publish(e) for e in events]
    cache = await KvProjectionCache.open(js, SHARD)
    folded = fold(None, [WalEvent(acks[0].seq, events[0])])
    assert folded is not None
    await cache.put("77", folded, revision=None)
    store = SnapshotStore(f"file://{tmp_path}/objects")
    manifest = system_manifests(["materialize"])[0]
    plugin = MaterializePlugin(catch_up_wait=0.1, catch_up_tries=2)
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=context_for(manifest, SHARD, cache=cache, snapshots=store),
                consumer="materialize", fetch_wait=0.2)

    async def acked() -> bool:
        try:
            info = await js.consumer_info(f"WAL_{SHARD}", f"materialize_{SHARD}")
        except NotFoundError:
            return False  # not created yet
        return info.ack_floor.stream_seq >= acks[-1].seq

    await pump_until([pump], acked, timeout=60)
    assert store.list_segments(SHARD) == []  # nothing caught up, so nothing written; the shard went on


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
