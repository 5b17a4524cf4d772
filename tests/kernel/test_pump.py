"""The pump with the real project plug-in against a real nats-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kernel.bootstrap import bootstrap
from kernel.host import ShardContext, context_for, system_manifests
from kernel.producer import Producer
from kernel.pump import DLQ_REASON, DLQ_SEQ, DLQ_STREAM, Pump
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.envelope import encode_envelope
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.fold import WalEvent
from projector.projection import canonical
from projector.replay import replay
from projector.snapshots import SnapshotStore
from system_playbooks.project.plugin import ProjectPlugin

SHARD = shard_for("acme", "web", "", 4)


def ev(execution_id: str, type: str, **kw: Any) -> Any:
    return new_event(tenant="acme", project="web", execution_id=execution_id, type=type, **kw)


async def pump_until(pump: Pump, done: Any, timeout: float = 30) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await done():
            assert asyncio.get_running_loop().time() < deadline, "pump did not get there in time"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def project_pump(js: JetStreamContext, cache: KvProjectionCache, tmp_path: Path, plugin: Any = None) -> Pump:
    manifest = system_manifests(["project"])[0]
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"))
    return Pump(js, shard=SHARD, shard_count=4, plugin=plugin or ProjectPlugin(), ctx=ctx, consumer="project", fetch_wait=0.2)


async def fresh_fold(js: JetStreamContext, execution_id: str) -> bytes:
    p = await replay(js, shard=SHARD, shard_count=4, tenant="acme", project="web", execution_id=execution_id)
    assert p is not None
    return canonical(p)


async def test_poison_goes_to_dlq_and_the_shard_keeps_folding(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    producer = Producer(js, topology)
    await producer.publish(ev("1", "execution.started"))
    plain = await nats.connect(nats_server.url)
    try:
        pjs = plain.jetstream()
        subject = f"wal.{SHARD}.acme.web.1.step.enter"
        bad_json = await pjs.publish(subject, b"{not json", headers={"Nats-Msg-Id": "p1"})
        wrong_exec = await pjs.publish(
            f"wal.{SHARD}.acme.web.2.step.enter", encode_envelope(ev("1", "step.enter", step="a")), headers={"Nats-Msg-Id": "p2"}
        )
        doc = json.loads(encode_envelope(ev("1", "step.enter", step="a")))
        doc["v"] = 9
        unknown_v = await pjs.publish(subject, json.dumps(doc).encode(), headers={"Nats-Msg-Id": "p3"})
    finally:
        await plain.close()
    after = [ev("1", "step.enter", step="a", attempt=1), ev("1", "step.exit", step="a", attempt=1, payload={"result": 5})]
    for e in after:
        await producer.publish(e)

    cache = await KvProjectionCache.open(js, SHARD)
    pump = project_pump(js, cache, tmp_path)

    async def folded() -> bool:
        entry = await cache.get("1")
        return entry is not None and entry.last_seq == 6

    await pump_until(pump, folded)
    entry = await cache.get("1")
    assert entry is not None and entry.projection is not None
    assert entry.projection.event_count == 3 and entry.projection.steps["a"].result == 5
    assert canonical(entry.projection) == await fresh_fold(js, "1")

    dlq = f"DLQ_{SHARD}"
    reasons = {}
    for seq in range(1, 4):
        msg = await js.get_msg(dlq, seq)
        assert msg.headers is not None
        reasons[int(msg.headers[DLQ_SEQ])] = (msg.subject, msg.headers[DLQ_REASON], msg.headers[DLQ_STREAM])
    assert set(reasons) == {bad_json.seq, wrong_exec.seq, unknown_v.seq}
    assert reasons[bad_json.seq][0] == f"dlq.{SHARD}.not_json" and "not valid JSON" in reasons[bad_json.seq][1]
    assert reasons[wrong_exec.seq][0] == f"dlq.{SHARD}.subject_mismatch" and "execution_id" in reasons[wrong_exec.seq][1]
    assert reasons[unknown_v.seq][0] == f"dlq.{SHARD}.invalid_envelope" and "v=9" in reasons[unknown_v.seq][1]
    assert all(r[2] == f"WAL_{SHARD}" for r in reasons.values())
    assert pump.stats.dlq == 3 and (await js.stream_info(dlq)).state.messages == 3


class FailOnceAfterWriting(ProjectPlugin):
    """Writes the batch, then 'crashes' before the ack: the batch is redelivered."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> None:
        self.calls += 1
        await super().handle(ctx, events)
        if self.calls == 1:
            raise RuntimeError("crash between the KV write and the ack")


async def test_duplicate_publish_and_redelivery_are_applied_once(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    producer = Producer(js, topology)
    events = [ev("7", "step.enter", step="s", attempt=1), ev("7", "user.note"), ev("7", "step.exit", step="s", attempt=1)]
    for e in events:
        await producer.publish(e)
    dup = await producer.publish(events[1])
    assert dup.duplicate
    cache = await KvProjectionCache.open(js, SHARD)
    plugin = FailOnceAfterWriting()
    pump = project_pump(js, cache, tmp_path, plugin)

    async def redelivered_and_acked() -> bool:
        if plugin.calls < 2:
            return False
        info = await js.consumer_info(f"WAL_{SHARD}", f"project_{SHARD}")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await pump_until(pump, redelivered_and_acked)
    entry = await cache.get("7")
    assert entry is not None and entry.projection is not None
    assert entry.projection.event_count == 3 and entry.projection.user_event_count == 1
    assert canonical(entry.projection) == await fresh_fold(js, "7")
    assert pump.stats.failures == 1


class FailOn(ProjectPlugin):
    """Raises whenever a batch holds the event ``bad_id`` — ``times`` times, or forever (None)."""

    def __init__(self, bad_id: str, times: int | None, on_fail: Any = None) -> None:
        super().__init__()
        self.bad_id, self.times, self.failed, self.on_fail = bad_id, times, 0, on_fail

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> Any:
        if any(e.env.event_id == self.bad_id for e in events) and (self.times is None or self.failed < self.times):
            self.failed += 1
            if self.on_fail:
                await self.on_fail()
            raise RuntimeError(f"cannot handle {self.bad_id}")
        return await super().handle(ctx, events)


async def test_a_failed_batch_is_redone_before_newer_events(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    producer = Producer(js, topology)
    first = [ev("21", "step.enter", step="a", attempt=1), ev("22", "step.enter", step="b", attempt=1)]
    await producer.publish_many(first)
    newer = [ev("21", "step.exit", step="a", attempt=1, payload={"result": 1}), ev("22", "user.note"), ev("23", "user.note")]

    async def publish_newer() -> None:
        # Newer events arrive while the failed batch waits to be redone: acking them must not skip it.
        if plugin.failed == 1:
            await producer.publish_many(newer)

    plugin = FailOn(first[0].event_id, times=2, on_fail=publish_newer)
    cache = await KvProjectionCache.open(js, SHARD)

    async def done() -> bool:
        entries = [await cache.get(x) for x in ("21", "22", "23")]
        return all(e is not None for e in entries) and sum(e.projection.event_count for e in entries if e and e.projection) == 5

    await pump_until([project_pump(js, cache, tmp_path, plugin)], done)
    for x in ("21", "22", "23"):
        entry = await cache.get(x)
        assert entry is not None and entry.projection is not None
        assert canonical(entry.projection) == await fresh_fold(js, x)
    assert plugin.failed == 2


async def test_a_message_that_always_fails_is_isolated_and_dead_lettered(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    producer = Producer(js, topology)
    events = [ev(str(30 + i % 3), "user.note", payload={"i": i}) for i in range(12)]
    acks = await producer.publish_many(events)
    bad = events[5]
    plugin = FailOn(bad.event_id, times=None)
    cache = await KvProjectionCache.open(js, SHARD)
    manifest = system_manifests(["project"])[0]
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"))
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=ctx, consumer="project",
                fetch_wait=0.2, max_deliver=3, isolate_after=2)

    async def done() -> bool:
        info = await js.stream_info(f"DLQ_{SHARD}")
        entries = [await cache.get(str(x)) for x in (30, 31, 32)]
        return info.state.messages == 1 and sum(e.projection.event_count for e in entries if e and e.projection) == 11

    await pump_until([pump], done)
    msg = await js.get_msg(f"DLQ_{SHARD}", 1)
    assert msg.subject == f"dlq.{SHARD}.max_deliver" and msg.headers is not None
    assert msg.headers[DLQ_SEQ] == str(acks[5].seq)  # type: ignore[union-attr]
    assert json.loads(msg.data)["event_id"] == bad.event_id
    assert "Nats-Expected-Stream" not in msg.headers
    assert pump.stats.failures >= 5 and pump.stats.dlq == 1


async def test_an_execution_id_reused_by_another_tenant_is_dead_lettered(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    other = next(f"t{i}" for i in range(1000) if shard_for(f"t{i}", "web", "", 4) == SHARD)
    producer = Producer(js, topology)
    await producer.publish(ev("77", "execution.started"))
    intruder = await producer.publish(new_event(tenant=other, project="web", execution_id="77", type="execution.started"))
    after = await producer.publish(ev("77", "user.note"))
    cache = await KvProjectionCache.open(js, SHARD)

    async def done() -> bool:
        entry = await cache.get("77")
        return entry is not None and entry.last_seq == after.seq

    await pump_until([project_pump(js, cache, tmp_path)], done)
    entry = await cache.get("77")
    assert entry is not None and entry.projection is not None
    assert entry.projection.tenant == "acme" and entry.projection.event_count == 2
    msg = await js.get_msg(f"DLQ_{SHARD}", 1)
    assert msg.subject == f"dlq.{SHARD}.execution_id_conflict" and msg.headers is not None
    assert msg.headers[DLQ_SEQ] == str(intruder.seq) and "acme/web" in msg.headers[DLQ_REASON]


async def test_a_pump_whose_consumer_cannot_be_created_yet_keeps_trying_and_then_folds(
    nc: nats.NATS, topology: Topology, tmp_path: Path
) -> None:
    # A clustered consumer whose create times out, or a stream not bootstrapped yet: the pump must not
    # die (its shard would stay leased and never fold); it retries until it can subscribe.
    js = nc.jetstream()
    await bootstrap(js, topology)
    cache = await KvProjectionCache.open(js, SHARD)
    await js.delete_stream(f"WAL_{SHARD}")  # the projection bucket is there, the WAL stream is not
    stop = asyncio.Event()
    task = asyncio.create_task(project_pump(js, cache, tmp_path).run(stop))
    try:
        await asyncio.sleep(1.5)  # several failed subscribes
        assert not task.done(), task
        await bootstrap(js, topology)  # the stream is back
        await Producer(js, topology).publish(ev("9", "execution.started"))
        deadline = asyncio.get_running_loop().time() + 30
        while (entry := await cache.get("9")) is None or entry.last_seq < 1:
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "the pump never folded after the stream came back"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class _Seen:
    """A plug-in that only records the envelopes it is handed."""

    def __init__(self) -> None:
        self.events: list[WalEvent] = []

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Any]:
        self.events += events
        return []


async def test_the_pumps_of_a_process_decode_each_event_once(
    js: JetStreamContext, topology: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernel.pump as pump_module

    decoded: list[int] = []
    real = pump_module.decode_wal_message

    def counting(subject: str, data: bytes, *, shard_count: int) -> Any:
        decoded.append(1)
        return real(subject, data, shard_count=shard_count)

    monkeypatch.setattr(pump_module, "decode_wal_message", counting)
    monkeypatch.setattr(pump_module, "DECODED", pump_module.Decoded())
    producer = Producer(js, topology)
    sent = [ev("31", "execution.started"), ev("31", "user.note", payload={"n": 1}), ev("31", "user.note", payload={"n": 2})]
    for e in sent:
        await producer.publish(e)
    cache = await KvProjectionCache.open(js, SHARD)
    seen = [_Seen(), _Seen()]
    ctx = context_for(system_manifests(["project"])[0], SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/o"))
    for plugin, consumer in zip(seen, ("project", "materialize")):
        pump = Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=ctx, consumer=consumer, fetch_wait=0.2)

        async def all_seen(plugin: _Seen = plugin) -> bool:
            return len(plugin.events) == len(sent)

        await pump_until(pump, all_seen)
    assert [e.env for e in seen[0].events] == [e.env for e in seen[1].events] == sent
    assert len(decoded) == len(sent)  # the second consumer's copies came from the first's decoding


class _Held:
    """Records the projection writes it is delivered; its first batch waits until ``release`` (the process 'dies')."""

    def __init__(self, *, hold: bool) -> None:
        self.writes: list[Any] = []
        self.hold = hold
        self.holding = asyncio.Event()

    async def handle(self, ctx: ShardContext, writes: Sequence[Any]) -> None:
        if self.hold:
            self.holding.set()
            await asyncio.Event().wait()  # never returns: the pump is cancelled in the middle of its batch
        self.writes += writes


async def test_a_bucket_write_superseded_in_flight_does_not_ack_the_rest_of_the_batch(
    js: JetStreamContext, tmp_path: Path
) -> None:
    # A bucket keeps one value per key: a value written again while its message is delivered and unacked is
    # terminated by the server as if acked. Under AckAll that would ack the batch's earlier messages as well,
    # and a process dying before it handled them would lose them. The pump acks a bucket's messages one by one.
    kv = await js.key_value(f"proj_{SHARD}")
    for key in ("a", "b", "c"):
        await kv.put(key, b"{}")
    manifest = system_manifests(["materialize"])[0]
    ctx = context_for(manifest, SHARD, cache=await KvProjectionCache.open(js, SHARD), snapshots=SnapshotStore(f"file://{tmp_path}/o"))

    def pump(plugin: _Held) -> Pump:
        return Pump(js, shard=SHARD, shard_count=4, plugin=plugin, ctx=ctx, consumer="materialize", source="projections",
                    fetch_wait=0.2)  # fmt: skip

    held = _Held(hold=True)
    stop = asyncio.Event()
    task = asyncio.create_task(pump(held).run(stop))
    await asyncio.wait_for(held.holding.wait(), 10)  # a, b and c delivered, not acked
    await kv.put("c", b'{"again":1}')  # c's message is gone from the bucket's stream
    await asyncio.sleep(0.3)
    task.cancel()  # the process dies in the middle of the batch
    with pytest.raises(asyncio.CancelledError):
        await task
    info = await js.consumer_info(f"KV_proj_{SHARD}", f"materialize_{SHARD}")
    assert info.ack_floor.stream_seq == 0, info.ack_floor  # a and b are still to be handled

    again = _Held(hold=False)
    await pump_until(pump(again), lambda: _true(len(again.writes) >= 3))
    assert [(w.execution_id, w.revision, w.data) for w in again.writes] == [("a", 1, b"{}"), ("b", 2, b"{}"), ("c", 4, b'{"again":1}')]


async def _true(value: bool) -> bool:
    return value


async def test_a_pump_with_types_delivers_only_those_filtered_or_not(js: JetStreamContext, topology: Topology, tmp_path: Path) -> None:
    # While it keeps up, its consumer filters on the types. Far behind, it reads every event and picks the types
    # itself: nats-server looks for a multi-filter consumer's next message by walking every subject of a message
    # block (one per execution and type on a WAL) while the consumer is behind — 75-80 % of its CPU under a flood.
    producer = Producer(js, topology)
    sent = [ev("41", "step.exit", step="a", attempt=1), ev("41", "execution.started"), ev("41", "step.exit", step="b", attempt=1),
            ev("41", "user.note"), ev("42", "step.exit", step="c", attempt=1), ev("41", "execution.completed"),
            ev("42", "user.note"), ev("42", "user.note"), ev("42", "step.exit", step="d", attempt=1), ev("42", "user.note")]  # fmt: skip
    for e in sent:
        await producer.publish(e)
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(system_manifests(["orchestrate"])[0], SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/o"))
    modes: list[tuple[bool, str]] = []

    held: list[Any] = []  # the consumer as NATS has it, at each batch

    class Modes(_Seen):
        async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Any]:
            modes.extend((pump.filtered, e.env.type) for e in events)
            held.append(await js.consumer_info(f"WAL_{SHARD}", f"typed_{SHARD}"))
            return await super().handle(ctx, events)

    seen = Modes()
    # One message a batch: three step.exit pending after the first, so it reads unfiltered from the second on,
    # and filters again once nothing is pending.
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=seen, ctx=ctx, consumer="typed", fetch_wait=0.2, max_batch=1,
                types=("step.exit", "execution.completed"), unfilter_at=3, refilter_at=1)  # fmt: skip

    async def acked_all() -> bool:
        try:
            info = await js.consumer_info(f"WAL_{SHARD}", f"typed_{SHARD}")
        except NotFoundError:
            return False  # not created yet
        return info.ack_floor.stream_seq >= len(sent) and bool(info.config.filter_subjects)

    await pump_until(pump, acked_all)
    assert [e.env for e in seen.events] == [sent[0], sent[2], sent[4], sent[5], sent[8]]
    assert [m[0] for m in modes] == [True, False, False, False, False]  # the rest of the WAL was read unfiltered
    info = await js.consumer_info(f"WAL_{SHARD}", f"typed_{SHARD}")
    assert sorted(info.config.filter_subjects) == [f"wal.{SHARD}.*.*.*.execution.completed", f"wal.{SHARD}.*.*.*.step.exit"]
    assert [bool(h.config.filter_subjects) for h in held] == [True, False, False, False, False]
    assert {h.created for h in held} == {info.created}  # switched in place: the durable was never re-created


async def test_a_pump_killed_anywhere_while_switching_filters_loses_no_wanted_event(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    # The switch recreates the consumer at the next sequence; a pump cancelled at any point (in a batch, between
    # the delete and the create) and started again must still hand every wanted event to the plug-in (again at
    # most, never skipped), in WAL order within each run.
    producer = Producer(js, topology)
    wanted = {"step.exit", "execution.completed"}
    sent = []
    for i in range(150):
        kind = ("step.exit", "user.note", "user.note", "execution.completed", "user.note")[i % 5]
        sent.append(ev(f"5{i % 7}", kind, **({"step": f"s{i}", "attempt": 1} if kind == "step.exit" else {})))
    seqs = [ack.seq for ack in [await producer.publish(e) for e in sent]]
    want = [s for s, e in zip(seqs, sent) if e.type in wanted]
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(system_manifests(["orchestrate"])[0], SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/o"))
    class Slow(_Seen):
        async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Any]:
            await asyncio.sleep(0.005)  # a batch takes a while, so the kills land all over a run
            return await super().handle(ctx, events)

    seen = Slow()

    def pump() -> Pump:
        return Pump(js, shard=SHARD, shard_count=4, plugin=seen, ctx=ctx, consumer="killed", fetch_wait=0.2, max_batch=3,
                    types=tuple(wanted), unfilter_at=2, refilter_at=1)  # fmt: skip

    for delay in (0.01, 0.04, 0.07, 0.1, 0.13, 0.17, 0.21):  # cancelled at different points of its run
        stop = asyncio.Event()
        task = asyncio.create_task(pump().run(stop))
        await asyncio.sleep(delay)
        stop.set()  # as the kernel does on a lost lease: a cancel Python 3.11's wait_for swallows still stops it
        task.cancel()
        await asyncio.wait([task], timeout=10)

    async def all_seen() -> bool:
        return set(want) <= {e.seq for e in seen.events}

    await pump_until(pump(), all_seen)
    assert {e.seq for e in seen.events} == set(want)  # every wanted event, and nothing else
    assert all(e.env.type in wanted for e in seen.events)


async def test_a_filter_switch_nats_refuses_goes_on_with_a_new_consumer(
    js: JetStreamContext, topology: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = Producer(js, topology)
    sent = [ev("61", "step.exit", step=f"s{i}", attempt=1) if i % 2 else ev("61", "user.note") for i in range(12)]
    for e in sent:
        await producer.publish(e)

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise nats.errors.Error("refused")

    monkeypatch.setattr(js, "add_consumer", refused)  # the in-place update; pull_subscribe creates through its own manager
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(system_manifests(["orchestrate"])[0], SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/o"))
    seen = _Seen()
    pump = Pump(js, shard=SHARD, shard_count=4, plugin=seen, ctx=ctx, consumer="refused", fetch_wait=0.2, max_batch=1,
                types=("step.exit",), unfilter_at=2, refilter_at=1)  # fmt: skip

    async def all_seen() -> bool:
        return len(seen.events) >= 6 and pump.filtered  # back to filtered: both switches went the fallback way

    await pump_until(pump, all_seen)
    assert [e.env for e in seen.events] == [e for e in sent if e.type == "step.exit"]
