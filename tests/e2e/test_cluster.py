"""Acceptance on a real 3-node cluster started by ``noetl-edge cluster up`` (R3 streams).

1. 10,000 events through :class:`~kernel.producer.Producer` while one node is
   SIGKILLed mid-way and restarted: every acked event is in the WAL exactly
   once (count, ids, and each ack's sequence holds that very event), a
   ``noetl-edge edge`` process serves the projections, and each equals a
   fresh fold of its WAL.
2. Two ``noetl-edge kernel`` processes: the one holding a shard's lease is
   SIGKILLed, the other takes the lease within the bound (TTL + renewal
   interval) and folds the events published after the kill.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from edge.auth import ensure_admin_token
from natscluster.local import LocalCluster
from kernel.connect import close, connect
from kernel.leases import lease_holder
from kernel.producer import Ack, Producer
from natscluster.server import free_port
from locator.envelope import Envelope, new_event
from locator.shard import shard_for
from locator.subjects import LEASES_BUCKET, proj_bucket, wal_stream
from locator.topology import Topology, load_topology
from projector.projection import decode_projection
from tests.conftest import stream_messages
from tests.e2e.conftest import Proc, check_invariant, e2e_env
from tests.cluster.test_cluster import ClusterCli

pytestmark = pytest.mark.slow

TENANT = "clu"
LEASE_TTL = 2
EVENTS, EXECUTIONS, BATCH = 10_000, 20, 500


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterCli]:
    cli = ClusterCli(tmp_path / "cluster", env=e2e_env(NOETL_LEASE_TTL=str(LEASE_TTL)))
    try:
        cli.up()
        yield cli
    finally:
        cli.teardown()


@pytest.fixture
def topology(cluster: ClusterCli) -> Topology:
    return load_topology(cluster.data_dir / "topology.yaml")


@pytest.fixture
async def cnc(topology: Topology) -> AsyncIterator[NATS]:
    nc = await connect(list(topology.cells[0].urls), name="pytest-cluster")
    try:
        yield nc
    finally:
        await close(nc)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.alive():
            proc.stop(timeout=15)


def start(procs: list[Proc], args: list[str], tmp: Path, name: str, ready: str) -> Proc:
    env = e2e_env(NOETL_LEASE_TTL=str(LEASE_TTL), NOETL_DATA_DIR=str(tmp / "data"))
    proc = Proc(args, env=env, logs=tmp, name=name)
    procs.append(proc)
    proc.ready_line(ready, timeout=60)
    return proc


def events_for(executions: list[tuple[str, str]], per_execution: int) -> list[Envelope]:
    """``per_execution`` user events for each (project, execution id), interleaved."""
    return [
        new_event(tenant=TENANT, project=project, execution_id=execution, type="user.tick", payload={"n": n})
        for n in range(per_execution)
        for project, execution in executions
    ]


async def wait_until_current(js: JetStreamContext, streams: list[str], timeout: float = 60.0) -> None:
    """Every replica of ``streams`` caught up (so a direct get from any of them sees every message)."""
    deadline = time.monotonic() + timeout
    while True:
        infos = [await js.stream_info(s) for s in streams]
        behind = [
            (i.config.name, p.name, p.lag) for i in infos for p in (i.cluster.replicas or []) if not p.current or p.lag
        ] if all(i.cluster for i in infos) else ["no cluster info"]  # fmt: skip
        if not behind and all(len(i.cluster.replicas or []) == 2 for i in infos if i.cluster):
            return
        assert time.monotonic() < deadline, f"replicas not current after {timeout}s: {behind}"
        await asyncio.sleep(0.2)


async def test_acked_events_survive_a_node_killed_mid_publish_exactly_once(
    cluster: ClusterCli, topology: Topology, cnc: NATS, procs: list[Proc], tmp_path: Path
) -> None:
    js = cnc.jetstream(timeout=10)
    ids = itertools.count(time.time_ns() // 1000)
    executions = [(f"p{i % 10}", str(next(ids))) for i in range(EXECUTIONS)]
    envs = events_for(executions, EVENTS // EXECUTIONS)
    streams = sorted({wal_stream(shard_for(TENANT, p, "", topology.shard_count)) for p, _ in executions})
    # The victim leads the WAL stream most events go to: its writes must fail over to a new leader.
    busiest = Counter(wal_stream(shard_for(TENANT, p, "", topology.shard_count)) for p, _ in executions).most_common(1)
    victim = (await js.stream_info(busiest[0][0])).cluster.leader  # type: ignore[union-attr]
    assert victim in cluster.pids()

    producer = Producer(js, topology, ack_timeout=5.0, retries=4)
    acks: dict[str, Ack] = {}
    pending = list(envs)
    restart: asyncio.Task[list[str]] | None = None
    killed_pid = cluster.pids()[victim]

    def restart_victim() -> list[str]:
        assert LocalCluster.existing(cluster.data_dir).wait_stopped(victim, timeout=10)
        return cluster.up()
    for round_ in range(30):
        for n in range(0, len(pending), BATCH):
            if restart is None and len(acks) >= EVENTS // 2:
                os.kill(killed_pid, signal.SIGKILL)
                restart = asyncio.create_task(asyncio.to_thread(restart_victim))  # restarts only the dead node
            for result in await producer.publish_many(pending[n : n + BATCH]):
                if isinstance(result, Ack):
                    acks[result.event_id] = result
        # Unacknowledged events may or may not be stored: publish them again, the same ids dedupe.
        pending = [e for e in envs if e.event_id not in acks]
        if not pending:
            break
    assert not pending, f"{len(pending)} events never acknowledged"
    assert restart is not None
    await restart
    assert cluster.pids()[victim] != killed_pid
    assert [n["healthy"] for n in cluster.status()["nodes"]] == [True] * 3
    await wait_until_current(js, streams)

    # Exactly once: every stored message is a distinct event of ours, every ack points at its own event.
    stored: dict[str, tuple[str, int]] = {}
    for stream in streams:
        info = await js.stream_info(stream)
        messages = await stream_messages(js, stream)
        assert [seq for seq, *_ in messages] == list(range(1, info.state.last_seq + 1)), "gaps in the WAL"
        for seq, _subject, msg_id, _data in messages:
            assert msg_id is not None and msg_id not in stored, f"{msg_id} stored twice"
            stored[msg_id] = (stream, seq)
    assert len(stored) == EVENTS and set(stored) == {e.event_id for e in envs}
    assert all(stored[i] == (a.stream, a.seq) for i, a in acks.items())

    # A kernel folds, a separate edge process serves; each projection equals a fresh fold of its WAL.
    topo = str(cluster.data_dir / "topology.yaml")
    start(procs, ["kernel", "--topology", topo, "--holder", "k1", "--data-dir", str(tmp_path / "data")], tmp_path,
          "kernel", "ready kernel k1 ")  # fmt: skip
    token = ensure_admin_token(tmp_path / "data").read_text().strip()
    bind = f"127.0.0.1:{free_port()}"
    start(procs, ["edge", "--topology", topo, "--bind", bind, "--data-dir", str(tmp_path / "data")], tmp_path, "edge",
          f"ready http://{bind}")  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://{bind}", headers={"Authorization": f"Bearer {token}"},
                                 timeout=60) as edge:  # fmt: skip
        for project, execution in executions:
            served = await check_invariant(js, edge, TENANT, project, execution)
            assert served.event_count == EVENTS // EXECUTIONS and served.status == "PENDING"


async def folded_count(js: JetStreamContext, shard: int, execution: str) -> int:
    try:
        entry = await (await js.key_value(proj_bucket(shard))).get(execution)
    except KeyNotFoundError:  # not folded yet
        return 0
    return decode_projection(entry.value or b"").event_count


async def test_a_killed_lease_holder_is_replaced_within_the_bound(
    cluster: ClusterCli, topology: Topology, cnc: NATS, procs: list[Proc], tmp_path: Path
) -> None:
    js = cnc.jetstream(timeout=10)
    topo = str(cluster.data_dir / "topology.yaml")
    data = str(tmp_path / "data")
    kernels = {
        h: start(procs, ["kernel", "--topology", topo, "--holder", h, "--data-dir", data], tmp_path, h, f"ready kernel {h} ")
        for h in ("k1", "k2")
    }
    leases = await js.key_value(LEASES_BUCKET)
    project, execution = "web", str(time.time_ns() // 1000)
    shard = shard_for(TENANT, project, "", topology.shard_count)
    producer = Producer(js, topology)

    async def publish_and_fold(n: int, total: int, timeout: float) -> float:
        began = time.monotonic()
        results = await producer.publish_many(events_for([(project, execution)], n))
        assert all(isinstance(r, Ack) for r in results)
        while await folded_count(js, shard, execution) < total:
            assert time.monotonic() - began < timeout, f"not folded within {timeout}s:\n" + "\n".join(
                k.logs() for k in kernels.values()
            )
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    async def holders() -> set[str | None]:
        return {getattr(await lease_holder(leases, s), "holder", None) for s in range(topology.shard_count)}

    deadline = time.monotonic() + 30
    while await holders() != {"k1", "k2"}:  # the second kernel's fair share arrives on a later tick
        assert time.monotonic() < deadline, f"the shards were never shared: {await holders()}"
        await asyncio.sleep(0.1)
    await publish_and_fold(50, 50, 60)
    before = await lease_holder(leases, shard)
    assert before is not None and before.holder in kernels

    kernels[before.holder].kill()
    survivor = "k2" if before.holder == "k1" else "k1"
    # Bound (kernel/leases.py): a dead holder's lease ages out after the TTL; the survivor's next tick
    # (TTL/3) takes it. Slack for a loaded two-core machine, and for the pump to start and fold.
    bound = LEASE_TTL + LEASE_TTL / 3
    await publish_and_fold(50, 100, bound + 15)
    after = await lease_holder(leases, shard)
    assert after is not None and after.holder == survivor
    assert kernels[survivor].alive()
