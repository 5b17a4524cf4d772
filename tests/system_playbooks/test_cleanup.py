"""system/cleanup against a real nats-server: ended executions move from the WAL to the history archive."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import pyarrow.ipc
import pytest
from nats.js import JetStreamContext

from kernel.host import PluginError, context_for, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.subjects import execution_filter, wal_stream
from locator.topology import Topology
from projector.archive import ArchiveError, ArchiveIndex, HistoryArchive, read_stored
from projector.cache import KvProjectionCache
from projector.fold import WalEvent, fold
from projector.projection import canonical
from projector.replay import history
from projector.snapshots import SnapshotStore
from system_playbooks.cleanup.plugin import CleanupPlugin, RetentionPolicy

SHARD = shard_for("acme", "web", "", 4)


def ev(execution_id: str, type: str, **kw: Any) -> Any:
    return new_event(tenant="acme", project="web", execution_id=execution_id, type=type, **kw)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("1.5m", 90.0), ("2h", 7200.0), ("7d", 604800.0), ("1w", 604800.0), ("OFF", None)])
def test_retention_durations(text: str, seconds: float | None) -> None:
    assert RetentionPolicy.parse(text).seconds == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "0s", "7 days", "1y", "1e3s"])
def test_a_bad_retention_is_refused_with_the_variable_named(text: str) -> None:
    with pytest.raises(PluginError, match="NOETL_HISTORY_RETENTION"):
        RetentionPolicy.parse(text)


async def all_history(js: JetStreamContext, execution_id: str, archive: HistoryArchive | None) -> list[WalEvent]:
    return [e async for e in history(js, shard=SHARD, shard_count=4, tenant="acme", project="web",
                                     execution_id=execution_id, archive=archive)]


async def wal_count(js: JetStreamContext, execution_id: str) -> int:
    return len(await read_stored(js, shard=SHARD, tenant="acme", project="web", execution_id=execution_id))


async def test_ended_executions_are_archived_verified_and_purged(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    producer = Producer(js, topology)
    for x, end in (("1", "execution.completed"), ("2", "execution.failed"), ("3", None)):
        await producer.publish(ev(x, "execution.started"))
        await producer.publish(ev(x, "step.enter", step="a", attempt=1))
        await producer.publish(ev(x, "user.note", payload={"n": x}))
        if end:
            await producer.publish(ev(x, end))
    plain = await nats.connect(nats_server.url)
    await plain.jetstream().publish(f"wal.{SHARD}.acme.web.2.user.note", b"\xff poison", headers={"Nats-Msg-Id": "p"})
    await plain.close()

    snapshots = SnapshotStore(f"file://{tmp_path}/objects")
    archive = HistoryArchive.at(snapshots.base_url)
    before = {x: await all_history(js, x, None) for x in "123"}
    stored_before = {x: await read_stored(js, shard=SHARD, tenant="acme", project="web", execution_id=x) for x in "123"}
    assert len(stored_before["2"]) == 5  # four events and the poison

    manifest = system_manifests(["cleanup"])[0]
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=snapshots, js=js, topology=topology)
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=CleanupPlugin(RetentionPolicy.parse("1s")), ctx=ctx,
                consumer="cleanup", fetch_wait=0.2, types=manifest.types)
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    index = ArchiveIndex(js, SHARD, archive.root)
    try:
        deadline = time.monotonic() + 30
        while (await index.get("1"))[0] is None or (await index.get("2"))[0] is None or await wal_count(js, "2"):
            assert time.monotonic() < deadline, "cleanup did not archive within 30 s"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

    # Archived executions are gone from the WAL, the running one is untouched.
    assert await wal_count(js, "1") == 0 and await wal_count(js, "2") == 0 and await wal_count(js, "3") == 3
    for x in "12":
        ref, _ = await index.get(x)
        assert ref is not None and len(ref.parts) == 1 and ref.count == len(stored_before[x])
        # Byte for byte, with seq, subject and headers, the archive holds what the WAL held (poison included).
        assert archive.read_part(ref.parts[0]) == stored_before[x]
        # Read across tiers, the history is the one from before; without the archive it is refused.
        assert await all_history(js, x, archive) == before[x]
        with pytest.raises(ArchiveError, match="archived"):
            await all_history(js, x, None)
    # Any Arrow tool reads a segment without noetl-edge.
    ref, _ = await index.get("1")
    assert ref is not None
    path = ref.parts[0].segment.removeprefix("file://")
    table = pyarrow.ipc.open_file(path).read_all()
    assert {"seq", "stored_at", "subject", "headers", "data", "execution_id", "tenant", "project"} <= set(table.column_names)
    assert set(table.column("execution_id").to_pylist()) == {"1", "2"}  # one segment for both

    # Archiving again is a no-op; a late event after the archive is read after it (archive, then WAL).
    assert (await ctx.archiver().archive_executions([("acme", "web", "1")])).executions == 0
    late = await producer.publish(ev("1", "user.note", payload={"late": True}))
    after = await all_history(js, "1", archive)
    assert after[:-1] == before["1"] and after[-1].seq == late.seq
    assert canonical(fold(None, after)) == canonical(fold(fold(None, before["1"]), [after[-1]]))  # type: ignore[arg-type]
    assert [e.seq for e in await all_history(js, "1", archive)] == [e.seq for e in after]
    # Only the archived seqs were purged: the WAL keeps the late event.
    msg = await js.get_msg(wal_stream(SHARD), seq=1, next=True, subject=execution_filter(SHARD, "acme", "web", "1"))
    assert msg.seq == late.seq


async def test_retention_off_holds_the_consumer(js: JetStreamContext, topology: Topology, tmp_path: Path) -> None:
    producer = Producer(js, topology)
    await producer.publish(ev("9", "execution.completed"))
    manifest = system_manifests(["cleanup"])[0]
    snapshots = SnapshotStore(f"file://{tmp_path}/objects")
    ctx = context_for(manifest, SHARD, cache=await KvProjectionCache.open(js, SHARD), snapshots=snapshots, js=js, topology=topology)
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=CleanupPlugin(RetentionPolicy.parse("off")), ctx=ctx,
                consumer="cleanup", fetch_wait=0.2, types=manifest.types)
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 10)  # a held pump still stops at once
    assert await wal_count(js, "9") == 1 and (await ArchiveIndex(js, SHARD, None).get("9"))[0] is None
    info = await js.consumer_info(wal_stream(SHARD), "cleanup_" + str(SHARD))
    assert info.ack_floor.stream_seq == 0  # not acked: turning retention on later archives it


async def test_a_purge_waits_while_a_kernel_consumer_holds_the_executions_messages_unacked(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    # nats-server terminates a purged message that is delivered and unacked as if acked, and under AckAll that
    # acks every message delivered before it: purged now, 41's events would ack 42's, never handled by the
    # orchestrator. The archiver waits (reported unfolded, so system/cleanup retries) until it acked them.
    from nats.js.api import AckPolicy, ConsumerConfig

    from projector.archive import Archiver

    producer = Producer(js, topology)
    for x, type in (("42", "execution.started"), ("41", "execution.started"), ("41", "execution.completed")):
        await producer.publish(ev(x, type))
    durable = f"orchestrate_{SHARD}"
    sub = await js.pull_subscribe(f"wal.{SHARD}.>", durable=durable, stream=wal_stream(SHARD),
                                  config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_deliver=-1))  # fmt: skip
    batch = await sub.fetch(3, timeout=5)  # the orchestrator is in the middle of this batch
    archiver = Archiver(js, shard=SHARD, shard_count=4, archive=HistoryArchive.at(f"file://{tmp_path}/objects"))

    report = await archiver.archive_executions([("acme", "web", "41")])
    assert (report.executions, report.unfolded) == (0, 1)
    assert await wal_count(js, "41") == 2
    info = await js.consumer_info(wal_stream(SHARD), durable)
    assert info.ack_floor.stream_seq == 0 and info.num_ack_pending == 3  # 42's event is still the orchestrator's

    await batch[-1].ack_sync()  # handled (and the server has the ack)
    report = await archiver.archive_executions([("acme", "web", "41")])
    assert (report.executions, report.unfolded) == (1, 0)
    assert await wal_count(js, "41") == 0 and await wal_count(js, "42") == 1


async def test_an_execution_due_after_one_that_is_not_waits_for_it(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    # Executions end in about WAL order, but their terminal events carry their producers' clocks. Archiving one
    # that comes after an execution not due yet would purge a message of the batch and, under AckAll, ack the
    # one not due with it: only the due ones before the first that is not are archived; the rest waits.
    from datetime import UTC, datetime, timedelta

    from kernel.host import Retry

    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    producer = Producer(js, topology)
    ends = []
    for x, ts in (("51", old), ("52", None), ("53", old)):
        await producer.publish(ev(x, "execution.started"))
        end = ev(x, "execution.completed", ts=ts)
        ends.append(WalEvent((await producer.publish(end)).seq, end))
    snapshots = SnapshotStore(f"file://{tmp_path}/objects")
    manifest = system_manifests(["cleanup"])[0]
    ctx = context_for(manifest, SHARD, cache=await KvProjectionCache.open(js, SHARD), snapshots=snapshots, js=js,
                      topology=topology)  # fmt: skip
    with pytest.raises(Retry, match="2 ended executions are not due yet") as waited:
        await CleanupPlugin(RetentionPolicy.parse("1h")).handle(ctx, ends)
    assert waited.value.delay == 300.0  # 52 holds the rest (due in about an hour; the longest wait is 5 minutes)
    assert [await wal_count(js, x) for x in ("51", "52", "53")] == [0, 2, 2]


async def test_the_purge_a_crash_left_behind_also_waits_for_unacked_messages(
    js: JetStreamContext, topology: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Archived and recorded, then the process died before the WAL's purge: the next call purges what is left,
    # but not while a kernel consumer holds those messages delivered and unacked either.
    from nats.js.api import AckPolicy, ConsumerConfig

    from projector.archive import Archiver

    producer = Producer(js, topology)
    for type in ("execution.started", "execution.completed"):
        await producer.publish(ev("61", type))
    archiver = Archiver(js, shard=SHARD, shard_count=4, archive=HistoryArchive.at(f"file://{tmp_path}/objects"))

    async def died_first(*args: Any) -> None:
        return None

    with monkeypatch.context() as m:
        m.setattr(archiver, "_purge", died_first)
        assert (await archiver.archive_executions([("acme", "web", "61")])).executions == 1
    assert await wal_count(js, "61") == 2  # archived, recorded, not purged

    durable = f"orchestrate_{SHARD}"
    sub = await js.pull_subscribe(f"wal.{SHARD}.>", durable=durable, stream=wal_stream(SHARD),
                                  config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_deliver=-1))  # fmt: skip
    batch = await sub.fetch(2, timeout=5)
    report = await archiver.archive_executions([("acme", "web", "61")])
    assert report.unfolded == 1 and await wal_count(js, "61") == 2
    await batch[-1].ack_sync()
    report = await archiver.archive_executions([("acme", "web", "61")])
    assert report.unfolded == 0 and await wal_count(js, "61") == 0
