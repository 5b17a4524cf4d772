"""The edge's read path through its HTTP API against a real nats-server: shard routing,
read-your-writes, the warm/cold/replay tiers and point-in-time reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.host import consumer_stream, context_for, load_plugin, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.envelope import decode_envelope
from locator.subjects import execution_filter, wal_stream
from locator.topology import Topology, default_topology
from projector.cache import KvProjectionCache
from projector.projection import Projection
from projector.replay import replay
from projector.snapshots import SnapshotStore

ADMIN = "tok-admin-readpath-0c9d2e"
H = {"Authorization": f"Bearer {ADMIN}"}
BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"
MIN_SEQ_WAIT = 1.0


def url(tenant: str, project: str, execution_id: str, suffix: str = "") -> str:
    return BASE.format(tenant=tenant, project=project) + f"/{execution_id}{suffix}"


def tenants_by_shard(project: str = "web", shard_count: int = 4) -> dict[int, str]:
    out: dict[int, str] = {}
    n = 0
    while len(out) < shard_count:
        out.setdefault(shard_for(f"tenant{n}", project, "", shard_count), f"tenant{n}")
        n += 1
    return out


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(f"file://{tmp_path}/objects")


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, store: SnapshotStore) -> AsyncIterator[Starlette]:
    a = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)],
        snapshots=store,
        min_seq_wait=MIN_SEQ_WAIT,
    )
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
        yield c


async def fresh(js: JetStreamContext, tenant: str, project: str, execution_id: str, **kw: Any) -> Projection | None:
    shard = shard_for(tenant, project, "", 4)
    return await replay(js, shard=shard, shard_count=4, tenant=tenant, project=project, execution_id=execution_id, **kw)


def served(p: Projection | None) -> Any:
    """What the edge serves for a projection (as parsed JSON)."""
    assert p is not None
    return msgspec.to_builtins(p)


def pumps(js: JetStreamContext, shard: int, cache: KvProjectionCache, store: SnapshotStore) -> list[Pump]:
    out = []
    for manifest in system_manifests():
        ctx = context_for(manifest, shard, cache=cache, snapshots=store)
        out.append(
            Pump(js, shard=shard, shard_count=4, plugin=load_plugin(manifest), ctx=ctx, consumer=manifest.consumer, source=manifest.source,
                 max_batch=manifest.max_batch, linger=0.05, fetch_wait=0.2)
        )
    return out


def caught_up(js: JetStreamContext, shard: int) -> Any:
    async def done() -> bool:
        for consumer in ("project", "materialize"):
            try:
                info = await js.consumer_info(consumer_stream(consumer, shard), f"{consumer}_{shard}")
            except NotFoundError:
                return False
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    return done


def history(tenant: str, project: str, execution_id: str, *, finish: str | None) -> list[Any]:
    def ev(type: str, **kw: Any) -> Any:
        return new_event(tenant=tenant, project=project, execution_id=execution_id, type=type, **kw)

    events = [
        ev("execution.requested", payload={"playbook": {"path": "demo/x", "version": 2}, "workload": {"n": 3}}),
        ev("execution.started"),
        ev("step.enter", step="a", attempt=1),
        ev("step.exit", step="a", attempt=1, payload={"result": {"rows": 7}}),
        ev("user.note", payload={"text": "hello"}),
        ev("step.enter", step="b", attempt=1),
        ev("call.error", step="b", attempt=1, payload={"error": {"kind": "timeout"}}),
        ev("step.retry", step="b", attempt=2),
        ev("step.exit", step="b", attempt=2, payload={"result": [1, 2, 3]}),
    ]
    if finish:
        events.append(ev(finish))
    return events


# --- shard routing ----------------------------------------------------------------------------


async def test_each_tenant_is_served_from_its_own_shard(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    tenants = tenants_by_shard()
    assert sorted(tenants) == [0, 1, 2, 3]
    started: dict[int, dict[str, Any]] = {}
    for shard, tenant in tenants.items():
        resp = await client.post(BASE.format(tenant=tenant, project="web"), json={"workload": {"shard": shard}}, headers=H)
        assert resp.status_code == 202, resp.text
        started[shard] = resp.json()
        x = started[shard]["execution_id"]
        ack = (await client.post(url(tenant, "web", x, "/events"), json={"type": "execution.started"}, headers=H)).json()
        assert ack["acks"][0]["stream"] == f"WAL_{shard}"

    for shard, tenant in tenants.items():
        out = started[shard]
        x = out["execution_id"]
        assert out["stream"] == f"WAL_{shard}" == f"WAL_{shard_for(tenant, 'web', '', 4)}"
        msg = await js.get_msg(out["stream"], out["seq"])
        assert msg.subject == f"wal.{shard}.{tenant}.web.{x}.execution.requested"
        assert decode_envelope(msg.data or b"").execution_id == x
        # No other shard's WAL holds any event of it.
        for other in range(4):
            if other != shard:
                with pytest.raises(NotFoundError):
                    await js.get_msg(wal_stream(other), seq=1, next=True, subject=execution_filter(other, tenant, "web", x))
        resp = await client.get(url(tenant, "web", x), headers=H)
        assert resp.status_code == 200, resp.text
        p = resp.json()
        assert (p["tenant"], p["execution_id"], p["workload"], p["status"], p["event_count"]) == (
            tenant, x, {"shard": shard}, "RUNNING", 2
        )
        assert p == served(await fresh(js, tenant, "web", x))
        events = (await client.get(url(tenant, "web", x, "/events"), headers=H)).json()["events"]
        assert [e["event"]["type"] for e in events] == ["execution.requested", "execution.started"]
        # Under another tenant (another shard) the same id is unknown.
        other_tenant = tenants[(shard + 1) % 4]
        assert (await client.get(url(other_tenant, "web", x), headers=H)).status_code == 404
    # Every stream got exactly its own tenant's two events.
    assert [(await js.stream_info(wal_stream(n))).state.messages for n in range(4)] == [2, 2, 2, 2]


# --- read-your-writes -------------------------------------------------------------------------


async def test_read_your_writes_without_a_kernel(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology
) -> None:
    producer = Producer(js, topology)
    x = "9000000001"
    acks = [await producer.publish(e) for e in history("acme", "web", x, finish=None)[:3]]
    # Unrelated traffic on the same shard between the writes.
    await producer.publish(new_event(tenant="acme", project="web", execution_id="9000000002", type="user.noise"))
    last = await producer.publish(new_event(tenant="acme", project="web", execution_id=x, type="step.exit", step="a", attempt=1))
    for ack in [*acks, last]:
        resp = await client.get(url("acme", "web", x), params={"min_seq": ack.seq}, headers=H)
        assert resp.status_code == 200, resp.text
        assert resp.json()["last_seq"] >= ack.seq
    p = resp.json()
    assert p["last_seq"] == last.seq and p["steps"]["a"]["status"] == "COMPLETED" and p["event_count"] == 4
    assert resp.headers["etag"] == f'"{last.seq}"'


async def test_read_your_writes_folds_the_tail_over_a_stale_cache(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology, store: SnapshotStore, pump_until: Any
) -> None:
    shard = shard_for("acme", "web", "", 4)
    producer = Producer(js, topology)
    x = "9000000011"
    await producer.publish_many(history("acme", "web", x, finish=None)[:4])
    cache = await KvProjectionCache.open(js, shard)
    await pump_until(pumps(js, shard, cache, store), caught_up(js, shard))  # then the kernel "stops"
    warm = await client.get(url("acme", "web", x), headers=H)
    assert warm.headers["x-noetl-source"] == "cache"
    cached_seq = warm.json()["last_seq"]

    ack = await producer.publish(new_event(tenant="acme", project="web", execution_id=x, type="user.after", payload={"i": 1}))
    assert ack.seq > cached_seq
    stale = await client.get(url("acme", "web", x), headers=H)
    assert stale.headers["x-noetl-source"] == "cache" and stale.json()["last_seq"] == cached_seq
    resp = await client.get(url("acme", "web", x), params={"min_seq": ack.seq}, headers=H)
    assert resp.status_code == 200, resp.text
    assert resp.json()["last_seq"] == ack.seq and resp.headers["x-noetl-source"] == "replay"
    assert resp.json() == served(await fresh(js, "acme", "web", x))
    # A min_seq the cache already satisfies is answered from the cache.
    ok = await client.get(url("acme", "web", x), params={"min_seq": cached_seq}, headers=H)
    assert ok.headers["x-noetl-source"] == "cache"


async def test_min_seq_in_the_future_is_a_bounded_504(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology
) -> None:
    x = "9000000021"
    ack = await Producer(js, topology).publish(new_event(tenant="acme", project="web", execution_id=x, type="execution.started"))
    want = ack.seq + 1_000_000
    loop = asyncio.get_running_loop()
    began = loop.time()
    resp = await client.get(url("acme", "web", x), params={"min_seq": want}, headers=H)
    elapsed = loop.time() - began
    assert resp.status_code == 504, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body) and body["status"] == 504
    assert body["instance"] == url("acme", "web", x)
    assert body["last_seq"] == ack.seq and body["min_seq"] == want
    assert str(want) in body["detail"]
    assert resp.headers["retry-after"].isdigit()
    assert elapsed < MIN_SEQ_WAIT + 10.0, f"504 took {elapsed:.1f}s, bound is {MIN_SEQ_WAIT}s"
    # min_seq on an unknown execution is a plain 404, not a wait.
    assert (await client.get(url("acme", "web", "9000000022"), params={"min_seq": 1}, headers=H)).status_code == 404


async def test_min_seq_waits_for_a_write_that_lands_during_the_wait(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, store: SnapshotStore
) -> None:
    app = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)],
        snapshots=store,
        min_seq_wait=20.0,
    )
    producer = Producer(js, topology)
    x = "9000000031"
    first = await producer.publish(new_event(tenant="acme", project="web", execution_id=x, type="execution.started"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
            get = asyncio.create_task(c.get(url("acme", "web", x), params={"min_seq": first.seq + 1}, headers=H))
            await asyncio.sleep(0.3)
            assert not get.done()
            second = await producer.publish(new_event(tenant="acme", project="web", execution_id=x, type="user.late"))
            assert second.seq == first.seq + 1
            resp = await asyncio.wait_for(get, 20)
            assert resp.status_code == 200, resp.text
            assert resp.json()["last_seq"] == second.seq and resp.json()["user_event_count"] == 1
    finally:
        await app.state.edge.cells.close()


# --- the tiers: cache, snapshot, replay --------------------------------------------------------


async def test_snapshot_then_scan_then_replay_serve_identical_bytes(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology, store: SnapshotStore, pump_until: Any
) -> None:
    shard = shard_for("acme", "web", "", 4)
    producer = Producer(js, topology)
    done, running = "9000000041", "9000000042"
    await producer.publish_many(history("acme", "web", done, finish="execution.completed"))
    await producer.publish_many(history("acme", "web", running, finish=None))
    cache = await KvProjectionCache.open(js, shard)

    async def materialized() -> bool:
        d, r = await cache.get(done), await cache.get(running)
        return (
            await caught_up(js, shard)()
            and d is not None and d.pointer is not None
            and r is not None and r.projection is not None and r.projection.event_count == 9
        )

    await pump_until(pumps(js, shard, cache, store), materialized)
    expected = served(await fresh(js, "acme", "web", done))
    assert expected["status"] == "COMPLETED"

    # 1. The KV entry is a pointer to a Feather row.
    one = await client.get(url("acme", "web", done), headers=H)
    assert one.status_code == 200 and one.headers["x-noetl-source"] == "snapshot"
    assert one.json() == expected

    # 2. The KV entry is purged: the segment is found by scanning.
    await (await KvProjectionCache.open(js, shard)).delete(done)
    assert await cache.get(done) is None
    two = await client.get(url("acme", "web", done), headers=H)
    assert two.status_code == 200 and two.headers["x-noetl-source"] == "snapshot"

    # 3. The segments are gone too: bounded replay from the WAL.
    segments = store.list_segments(shard)
    assert segments
    for segment in segments:
        store.delete(segment)
    assert store.list_segments(shard) == []
    three = await client.get(url("acme", "web", done), headers=H)
    assert three.status_code == 200 and three.headers["x-noetl-source"] == "replay"

    assert one.content == two.content == three.content
    assert one.headers["etag"] == two.headers["etag"] == three.headers["etag"] == f'"{expected["last_seq"]}"'

    # A non-materialized execution whose KV entry is warm comes from the cache (segments or not).
    warm = await client.get(url("acme", "web", running), headers=H)
    assert warm.status_code == 200 and warm.headers["x-noetl-source"] == "cache"
    assert warm.json() == served(await fresh(js, "acme", "web", running))
    assert warm.json()["status"] == "RUNNING"


async def test_a_cache_entry_of_another_tenant_is_not_served(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology, store: SnapshotStore, pump_until: Any
) -> None:
    # Two tenants on the same shard using the same execution id: each sees only its own.
    shard = shard_for("acme", "web", "", 4)
    other = next(f"t{n}" for n in range(1000) if shard_for(f"t{n}", "web", "", 4) == shard)
    x = "9000000051"
    producer = Producer(js, topology)
    await producer.publish_many(history("acme", "web", x, finish=None)[:2])
    cache = await KvProjectionCache.open(js, shard)
    await pump_until(pumps(js, shard, cache, store), caught_up(js, shard))
    assert (await client.get(url("acme", "web", x), headers=H)).headers["x-noetl-source"] == "cache"
    assert (await client.get(url(other, "web", x), headers=H)).status_code == 404
    # Nor does the warm entry make the id "known" to the other tenant when it posts events.
    before = (await js.stream_info(wal_stream(shard))).state.last_seq
    posted = await client.post(url(other, "web", x, "/events"), json={"type": "user.sneaky"}, headers=H)
    assert posted.status_code == 404, posted.text
    assert (await js.stream_info(wal_stream(shard))).state.last_seq == before
    await producer.publish(new_event(tenant=other, project="web", execution_id=x, type="user.mine"))
    resp = await client.get(url(other, "web", x), headers=H)
    assert resp.status_code == 200 and resp.json()["tenant"] == other and resp.json()["event_count"] == 1


# --- as_of_seq --------------------------------------------------------------------------------


async def test_as_of_seq_equals_a_bounded_fresh_fold(
    client: httpx.AsyncClient, js: JetStreamContext, topology: Topology
) -> None:
    producer = Producer(js, topology)
    x, noise = "9000000061", "9000000062"
    mine = history("acme", "web", x, finish="execution.failed")
    others = history("acme", "web", noise, finish=None)
    await producer.publish(new_event(tenant="acme", project="web", execution_id="9000000063", type="user.first"))
    seqs: list[int] = []
    for i, env in enumerate(mine):
        seqs.append((await producer.publish(env)).seq)
        if i < len(others):
            await producer.publish(others[i])  # interleaved: as_of_seq may fall on another execution's event
    last = seqs[-1]
    for n in sorted({seqs[0], seqs[0] + 1, seqs[2], seqs[3] + 1, seqs[6], last - 1, last, last + 5}):
        resp = await client.get(url("acme", "web", x), params={"as_of_seq": n}, headers=H)
        assert resp.status_code == 200, (n, resp.text)
        assert resp.headers["x-noetl-source"] == "replay"
        expected = await fresh(js, "acme", "web", x, until_seq=n)
        assert resp.json() == served(expected), n
        assert resp.json()["last_seq"] == max(s for s in seqs if s <= n)
        assert resp.json()["event_count"] == sum(1 for s in seqs if s <= n)
        assert resp.headers["etag"] == f'"{resp.json()["last_seq"]}"'
    assert (await client.get(url("acme", "web", x), params={"as_of_seq": last}, headers=H)).json()["status"] == "FAILED"
    assert (await client.get(url("acme", "web", x), params={"as_of_seq": seqs[2]}, headers=H)).json()["status"] == "RUNNING"
    # Before the first event there is nothing to show.
    assert seqs[0] == 2
    resp = await client.get(url("acme", "web", x), params={"as_of_seq": 1}, headers=H)
    assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
    resp = await client.get(url("acme", "web", noise), params={"as_of_seq": 1}, headers=H)
    assert resp.status_code == 404
    # The full read still equals the full fold.
    assert (await client.get(url("acme", "web", x), headers=H)).json() == served(await fresh(js, "acme", "web", x))
