"""Reading a subject of a WAL stream leaves no consumer behind, short or long, whole or cut short."""

from __future__ import annotations

from nats.js import JetStreamContext

from kernel.producer import Producer
from locator import new_event, shard_for
from locator.subjects import execution_filter, wal_stream
from locator.topology import Topology
from projector.walread import DIRECT_FIRST, read_subject

SHARD = shard_for("acme", "web", "", 4)


async def consumers(js: JetStreamContext) -> int:
    return (await js.stream_info(wal_stream(SHARD))).state.consumer_count


async def test_short_and_long_reads_leave_no_consumer(js: JetStreamContext, topology: Topology) -> None:
    producer = Producer(js, topology)
    short = [new_event(tenant="acme", project="web", execution_id="1", type="user.n", payload={"i": i}) for i in range(5)]
    long = [new_event(tenant="acme", project="web", execution_id="2", type="user.n", payload={"i": i})
            for i in range(DIRECT_FIRST * 3)]
    interleaved = [e for pair in zip(long[: len(short)], short, strict=True) for e in pair] + long[len(short):]
    acks = {e.event_id: await producer.publish(e) for e in interleaved}

    for _ in range(50):  # what pile-up looked like: one ephemeral consumer per read, alive for its threshold
        got = [m async for m in read_subject(js, wal_stream(SHARD), execution_filter(SHARD, "acme", "web", "1"))]
        assert [m.seq for m in got] == [acks[e.event_id].seq for e in short]
    assert await consumers(js) == 0

    pending: list[int] = []
    got = [m async for m in read_subject(js, wal_stream(SHARD), execution_filter(SHARD, "acme", "web", "2"),
                                         on_pending=lambda read, left: pending.append(left))]
    assert [m.seq for m in got] == [acks[e.event_id].seq for e in long]
    assert pending[0] == len(long) - DIRECT_FIRST - 1 and pending[-1] == 0  # the consumer took over after the gets
    assert all(m.stored_at_ns > 0 and m.headers.get("Nats-Msg-Id") for m in got)
    assert not any(k in m.headers for m in got for k in ("Nats-Sequence", "Nats-Stream", "Nats-Time-Stamp"))
    assert await consumers(js) == 0

    # A read stopped early (a page, a limit) deletes its consumer too.
    reader = read_subject(js, wal_stream(SHARD), execution_filter(SHARD, "acme", "web", "2"))
    n = 0
    async for _ in reader:
        n += 1
        if n == DIRECT_FIRST + 5:
            break
    await reader.aclose()
    assert await consumers(js) == 0
    until = acks[long[10].event_id].seq
    assert [m.seq async for m in read_subject(js, wal_stream(SHARD), execution_filter(SHARD, "acme", "web", "2"),
                                              until_seq=until)][-1] == until
