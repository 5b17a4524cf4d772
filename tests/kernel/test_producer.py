from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext

from kernel.bootstrap import StreamSettings, bootstrap
from kernel.connect import close, connect
from kernel.errors import KernelError, PublishError
from kernel.producer import Ack, Producer, Rejected
from natscluster.server import EmbeddedServer, free_port
from locator import Envelope, EnvelopeError, PayloadTooLarge, new_event, shard_for
from locator.topology import Topology, default_topology


def event(i: int = 1, **kw: Any) -> Envelope:
    fields: dict[str, Any] = {"tenant": "acme", "project": "web", "execution_id": str(1000 + i), "type": "user.note"}
    fields.update(kw)
    fields.setdefault("payload", {"i": i})
    return new_event(**fields)


async def test_publish_acks_on_the_expected_stream(js: JetStreamContext, topology: Topology, read_stream: Any) -> None:
    env = event(payload={"text": "hello"})
    ack = await Producer(js, topology).publish(env)
    shard = shard_for("acme", "web", "", 4)
    assert ack.stream == f"WAL_{shard}" and ack.seq == 1 and not ack.duplicate
    assert ack.subject == f"wal.{shard}.acme.web.{env.execution_id}.user.note"
    [(seq, subject, msg_id, data)] = await read_stream(js, ack.stream)
    assert (seq, subject, msg_id) == (1, ack.subject, env.event_id)
    assert json.loads(data)["payload"] == {"text": "hello"}


async def test_same_event_twice_is_stored_once(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    producer = Producer(js, topology)
    env = event()
    first = await producer.publish(env)
    second = await producer.publish(env)
    assert not first.duplicate and second.duplicate and second.seq == first.seq
    assert sum(await count_wal(js, 4)) == 1


async def test_oversize_and_invalid_change_nothing(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    producer = Producer(js, topology)
    with pytest.raises(PayloadTooLarge, match="over the 65536-byte cap"):
        await producer.publish(event(payload={"blob": "x" * 70_000}))
    bad = msgspec.structs.replace(event(), tenant="Not.Valid")
    with pytest.raises(EnvelopeError) as e:
        await producer.publish(bad)
    assert e.value.field == "tenant"
    with pytest.raises(EnvelopeError) as e:
        await producer.publish(msgspec.structs.replace(event(), v=2))
    assert e.value.field == "v"
    assert sum(await count_wal(js, 4)) == 0


async def test_server_limit_refusal_is_an_error_not_an_ack(nc: Any, topology: Topology, count_wal: Any) -> None:
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(max_msg_size=1024))
    producer = Producer(js, topology)
    with pytest.raises(PublishError, match="server refused"):
        await producer.publish(event(payload={"blob": "x" * 2000}))
    [result] = await producer.publish_many([event(payload={"blob": "y" * 2000})])
    assert isinstance(result, Rejected) and "server refused" in result.error
    assert sum(await count_wal(js, 4)) == 0


async def test_send_then_confirm_keeps_order_and_dedupes(js: JetStreamContext, topology: Topology, read_stream: Any) -> None:
    # send() queues without waiting: an event published after it still lands after it in the WAL.
    producer = Producer(js, topology)
    claim, outcome = event(1, type="command.claimed", step="a"), event(1, type="step.exit", step="a")
    sent = await producer.send(claim)
    after = await producer.publish(outcome)
    first = await producer.confirm(sent)
    assert first.seq < after.seq and not first.duplicate
    again = await producer.confirm(await producer.send(claim))
    assert again.duplicate and again.seq == first.seq
    stored = await read_stream(js, first.stream)
    assert [msg_id for _, _, msg_id, _ in stored] == [claim.event_id, outcome.event_id]


async def test_confirm_reports_a_refusal_or_a_missing_stream_as_an_error(
    nc: Any, topology: Topology, count_wal: Any
) -> None:
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(max_msg_size=1024))
    producer = Producer(js, topology, ack_timeout=1.0, retries=1, retry_backoff=0.05)
    with pytest.raises(PublishError, match="server refused"):
        await producer.confirm(await producer.send(event(payload={"blob": "x" * 2000})))
    # A client topology with more shards than the server has: acme/web is shard 7 of 8, and no stream answers.
    wide = default_topology(shard_count=8)
    assert shard_for("acme", "web", "", 8) == 7
    with pytest.raises(PublishError, match="no stream answered"):
        await Producer(js, wide, ack_timeout=1.0, retries=1, retry_backoff=0.05).confirm(
            await Producer(js, wide).send(event())
        )
    with pytest.raises(EnvelopeError):
        await producer.send(msgspec.structs.replace(event(), tenant="Not.Valid"))
    assert sum(await count_wal(js, 4)) == 0


async def test_confirm_many_answers_in_order_and_publishes_again_what_got_no_answer(
    nc: Any, topology: Topology, read_stream: Any
) -> None:
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(max_msg_size=1024))
    producer = Producer(js, topology, ack_timeout=0.5, retries=1, retry_backoff=0.05)
    events = [event(1, type="step.enter", step=f"s{i}") for i in range(5)]
    sents = [await producer.send(e) for e in events]
    # One whose answer never comes (lost with a connection, say): its future stays pending.
    lost = await producer.send(event(1, type="step.enter", step="lost"))
    lost = type(lost)(lost.prepared, asyncio.get_running_loop().create_future())
    acks = await producer.confirm_many([*sents, lost])
    assert [a.event_id for a in acks] == [*(e.event_id for e in events), lost.prepared.env.event_id]
    assert [a.seq for a in acks] == list(range(1, 7)) and not any(a.duplicate for a in acks[:-1])
    assert acks[-1].duplicate  # it had been stored, only its answer was lost: published again, dropped as a copy
    stored = await read_stream(js, acks[0].stream)
    assert [msg_id for _, _, msg_id, _ in stored] == [a.event_id for a in acks]  # each once
    # A refusal among them is raised; the acks before it were confirmed (and stored).
    ok = await producer.send(event(2))
    refused = await producer.send(event(3, payload={"blob": "x" * 2000}))
    with pytest.raises(PublishError, match="server refused"):
        await producer.confirm_many([ok, refused])
    assert ok.future is not None and ok.future.done() and ok.future.result().seq > acks[-1].seq


async def test_batch_of_10000_all_acked_and_present(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    events = [event(i, execution_id=str(10_000 + i % 200)) for i in range(10_000)]
    progress: list[int] = []
    results = await Producer(js, topology).publish_many(events, on_progress=progress.append)
    assert sum(progress) == 10_000
    assert all(isinstance(r, Ack) and not r.duplicate for r in results)
    acks = [r for r in results if isinstance(r, Ack)]
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    assert len({(a.stream, a.seq) for a in acks}) == 10_000
    assert sum(await count_wal(js, 4)) == 10_000
    again = await Producer(js, topology).publish_many(events[:100])
    assert all(isinstance(r, Ack) and r.duplicate for r in again)
    assert sum(await count_wal(js, 4)) == 10_000


async def test_batch_reports_invalid_events_in_place(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    events = [event(0), msgspec.structs.replace(event(1), execution_id="x1"), event(2), event(3, payload={"b": "x" * 70_000})]
    results = await Producer(js, topology).publish_many(events)
    assert isinstance(results[0], Ack) and isinstance(results[2], Ack)
    assert isinstance(results[1], Rejected) and results[1].field == "execution_id" and results[1].index == 1
    assert isinstance(results[3], Rejected) and results[3].field == "payload"
    assert sum(await count_wal(js, 4)) == 2


async def test_unreachable_server_never_reports_written(tmp_path: Any) -> None:
    topology = default_topology()
    server = EmbeddedServer(data_dir=tmp_path, topology=topology, port=0)
    server.start()
    nc = await connect([server.url], name="pytest")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        server.kill()
        producer = Producer(js, topology, ack_timeout=0.3, retries=2, retry_backoff=0.05)
        with pytest.raises(PublishError, match="not acknowledged after 3 tries"):
            await producer.publish(event())
        results = await producer.publish_many([event(i) for i in range(5)])
        assert all(isinstance(r, Rejected) and "not acknowledged" in r.error for r in results)
    finally:
        await close(nc)
        server.stop()


async def test_connect_failure_is_a_kernel_error() -> None:
    with pytest.raises(KernelError, match="cannot connect to NATS"):
        await connect([f"nats://127.0.0.1:{free_port()}"], name="pytest", connect_timeout=0.5)


async def test_server_restart_mid_batch_loses_and_doubles_nothing(tmp_path: Any, read_stream: Any) -> None:
    topology = default_topology(shard_count=1)
    server = EmbeddedServer(data_dir=tmp_path, topology=topology, port=0)
    server.start()
    nc = await connect([server.url], name="pytest")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        producer = Producer(js, topology, ack_timeout=1.0, retries=10, retry_backoff=0.1)
        events = [event(i) for i in range(3000)]

        async def crash_and_restart() -> None:
            await asyncio.sleep(0.05)
            server.kill()
            await asyncio.sleep(0.5)
            server.start()

        results, _ = await asyncio.gather(producer.publish_many(events), crash_and_restart())
        acked = {r.event_id for r in results if isinstance(r, Ack)}
        stored = [msg_id for _, _, msg_id, _ in await read_stream(js, "WAL_0")]
        assert len(stored) == len(set(stored)), "an event was stored twice"
        assert acked <= set(stored), "an event reported as written is missing"
        assert len(acked) + sum(isinstance(r, Rejected) for r in results) == 3000
    finally:
        await close(nc)
        server.stop()
