"""A live supercluster: two cells (one nats-server each) joined by gateways, the locator routing between them.

The servers' configs come from :func:`natscluster.natsconf.render_supercluster_configs`,
the renderer of the committed ``nats/supercluster/*.conf``. One bootstrap,
through the ``west`` cell only, places every shard's streams and projection
bucket in the cell that owns the shard (JetStream placement by cluster) and
the global buckets in the first cell. Then:

1. events of executions on every shard go through a producer connected to
   ``east`` only (JetStream publishes cross the gateway), and more through the
   topology-free ``in.…`` subject on a ``west`` connection (the server's
   ``partition()`` mapping, then the gateway): each ack names the shard's
   stream, and each WAL stream, asked from its own cell, lives there and holds
   exactly its shard's events;
2. one kernel per cell, connected to that cell only, leases and folds its
   own cell's shards and nothing else;
3. one edge with the two-cell topology serves projections of executions of
   both cells, each equal to a fresh fold of its WAL.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from edge.app import create_app
from edge.auth import TokenSpec
from edge.cli.cluster import bootstrap_when_ready
from kernel.bootstrap import StreamSettings, bootstrap, global_assets, shard_assets
from natscluster.local import monitor_json
from kernel.connect import close, connect
from kernel.errors import BootstrapMismatch
from kernel.leases import lease_holder
from natscluster.natsconf import NodeSpec, render_supercluster_configs
from kernel.producer import Ack, Producer
from kernel.runtime import Kernel
from natscluster.server import EmbeddedServer, free_port
from locator.envelope import encode_envelope, new_event
from locator.shard import shard_for
from locator.subjects import (
    LEASES_BUCKET,
    cmd_stream,
    dlq_stream,
    hist_bucket,
    ingest_subject,
    proj_bucket,
    wal_stream,
)
from locator.topology import Cell, Topology, make_topology
from projector.projection import decode_projection
from projector.snapshots import SnapshotStore
from tests.conftest import stream_messages
from tests.e2e.conftest import SHARDS, check_invariant, executions_url

pytestmark = pytest.mark.slow

TENANT = "sc"
CELLS = {"east": (0, 1), "west": (2, 3)}
PER_EXECUTION = 6
ADMIN = "supercluster-admin-token"


class CellServer(EmbeddedServer):
    """One cell's only server, started on a config rendered for the whole supercluster."""

    def __init__(self, spec: NodeSpec, *, config: str, data_dir: Path, topology: Topology) -> None:
        super().__init__(
            data_dir=data_dir, topology=topology, host=spec.bind, port=spec.port, monitor_port=spec.monitor_port,
            server_name=spec.name,
        )  # fmt: skip
        self.spec = spec
        self.config = config

    def render_config(self) -> str:
        return self.config


@dataclass
class Supercluster:
    topology: Topology
    servers: dict[str, CellServer]  # cell -> its server


def two_cell_topology(urls: Mapping[str, tuple[str, ...]], owners: Mapping[str, tuple[int, ...]]) -> Topology:
    cells = [Cell(name=cell, urls=urls[cell], shards=shards) for cell, shards in owners.items()]
    return make_topology(shard_count=SHARDS, replicas=1, cells=cells)


def wait_joined(servers: dict[str, CellServer], *, timeout: float = 30.0) -> None:
    """Every server sees the other cell's gateway and a JetStream meta group of both servers with a leader."""
    deadline = time.monotonic() + timeout
    while True:
        states = {}
        for cell, server in servers.items():
            jsz = monitor_json(server.spec, "jsz") or {}
            gatewayz = monitor_json(server.spec, "gatewayz") or {}
            meta = jsz.get("meta_cluster") or {}
            states[cell] = (bool(meta.get("leader")), meta.get("cluster_size"), sorted(gatewayz.get("outbound_gateways") or {}))
        others = {cell: sorted(set(servers) - {cell}) for cell in servers}
        if all(s[0] and s[1] == len(servers) and s[2] == others[c] for c, s in states.items()):
            return
        assert time.monotonic() < deadline, f"the cells did not join within {timeout}s: {states}"
        time.sleep(0.1)


@pytest.fixture
def supercluster(tmp_path: Path) -> Iterator[Supercluster]:
    nodes = {
        cell: [
            NodeSpec(
                name=f"{cell}-1", host="127.0.0.1", bind="127.0.0.1", port=free_port(), monitor_port=free_port(),
                cluster_port=free_port(), gateway_port=free_port(), store_dir=str(tmp_path / cell / "jetstream"),
            )
        ]
        for cell in CELLS
    }  # fmt: skip
    topology = two_cell_topology({c: tuple(n.client_url for n in nodes[c]) for c in CELLS}, CELLS)
    configs = render_supercluster_configs(topology=topology, cells=nodes)
    servers = {
        cell: CellServer(nodes[cell][0], config=configs[cell][f"{cell}-1"], data_dir=tmp_path / cell, topology=topology)
        for cell in CELLS
    }
    try:
        for server in servers.values():
            server.start()
        wait_joined(servers)
        yield Supercluster(topology, servers)
    finally:
        for server in servers.values():
            server.stop()


def projects_by_shard() -> dict[int, str]:
    out: dict[int, str] = {}
    for n in itertools.count():
        out.setdefault(shard_for(TENANT, f"p{n}", "", SHARDS), f"p{n}")
        if len(out) == SHARDS:
            return out
    raise AssertionError("unreachable")


async def folded(js: JetStreamContext, shard: int, execution: str) -> int:
    kv = await js.key_value(proj_bucket(shard))
    try:
        entry = await kv.get(execution)
    except KeyNotFoundError:  # not folded yet
        return 0
    return decode_projection(entry.value or b"").event_count


@pytest.fixture
async def cell_js(supercluster: Supercluster) -> AsyncIterator[dict[str, JetStreamContext]]:
    """A JetStream context per cell, each on a connection to that cell only."""
    conns = {c.name: await connect(list(c.urls), name=f"pytest-{c.name}") for c in supercluster.topology.cells}
    try:
        yield {cell: nc.jetstream(timeout=10) for cell, nc in conns.items()}
    finally:
        for nc in conns.values():
            await close(nc)


async def test_two_cells_place_route_fold_and_serve(
    supercluster: Supercluster, cell_js: dict[str, JetStreamContext], tmp_path: Path
) -> None:
    topo = supercluster.topology
    owner = {shard: topo.cell_for_shard(shard).name for shard in range(SHARDS)}

    # One bootstrap through the west cell lays out both cells.
    report = await bootstrap_when_ready(list(topo.cell("west").urls), topo, settings=StreamSettings())
    every = SHARDS * len(shard_assets(0, shard_count=SHARDS, replicas=1, settings=StreamSettings()))
    assert len(report.created) == every + len(global_assets(replicas=1, settings=StreamSettings())) and not report.unchanged
    for shard, cell in owner.items():
        for stream in (wal_stream(shard), cmd_stream(shard), dlq_stream(shard), f"KV_{proj_bucket(shard)}", f"KV_{hist_bucket(shard)}"):
            info = await cell_js[cell].stream_info(stream)
            assert info.cluster is not None and info.cluster.name == cell, (stream, info.cluster)
    for stream in ("KV_catalog", "KV_leases", "OBJ_plugins", "KV_keychain", "KV_schedules"):  # the global buckets: the first cell
        info = await cell_js["west"].stream_info(stream)
        assert info.cluster is not None and info.cluster.name == "east", (stream, info.cluster)
    assert (await bootstrap(cell_js["east"], topo)).created == []
    # A topology that gives the shards to the other cells is refused, nothing moved or created.
    swapped = two_cell_topology({c.name: c.urls for c in topo.cells}, {"east": (2, 3), "west": (0, 1)})
    with pytest.raises(BootstrapMismatch) as refused:
        await bootstrap(cell_js["east"], swapped)
    assert "WAL_0 lives in cluster 'east', topology places it in cell 'west'" in str(refused.value)
    assert "KV_proj_3 lives in cluster 'west', topology places it in cell 'east'" in str(refused.value)

    projects = projects_by_shard()
    ids = itertools.count(time.time_ns() // 1000)
    direct = [(projects[s], str(next(ids))) for s in range(SHARDS)]
    ingested = [(projects[s], str(next(ids))) for s in range(SHARDS)]

    # 1a. A producer that talks to the east cell only: half of these events belong to the west cell.
    envs = [
        new_event(tenant=TENANT, project=p, execution_id=e, type="user.tick", payload={"n": n})
        for n in range(PER_EXECUTION)
        for p, e in direct
    ]
    results = await Producer(cell_js["east"], topo).publish_many(envs)
    assert all(isinstance(r, Ack) and not r.duplicate for r in results), results
    assert [r.stream for r in results if isinstance(r, Ack)] == [
        wal_stream(shard_for(TENANT, e.project, "", SHARDS)) for e in envs
    ]
    # 1b. The topology-free ingest subject on a west connection: the server maps it onto the shard.
    for p, e in ingested:
        for n in range(PER_EXECUTION):
            env = new_event(tenant=TENANT, project=p, execution_id=e, type="user.tock", payload={"n": n})
            ack = await cell_js["west"].publish(
                ingest_subject(TENANT, p, e, env.type), encode_envelope(env), headers={"Nats-Msg-Id": env.event_id}
            )
            assert ack.stream == wal_stream(shard_for(TENANT, p, "", SHARDS)) and not ack.duplicate

    # Each WAL, asked from its own cell, lives there and holds exactly its shard's two executions.
    for shard, cell in owner.items():
        info = await cell_js[cell].stream_info(wal_stream(shard))
        assert info.cluster is not None and info.cluster.name == cell
        subjects = [subject for _, subject, _, _ in await stream_messages(cell_js[cell], wal_stream(shard))]
        assert len(subjects) == 2 * PER_EXECUTION
        mine = {direct[shard][1], ingested[shard][1]}
        assert {s.split(".")[4] for s in subjects} == mine and all(s.startswith(f"wal.{shard}.") for s in subjects)

    # 2. A kernel per cell, on that cell's connection: it leases and folds its own shards only.
    store = SnapshotStore(f"file://{tmp_path}/objects")
    stop = asyncio.Event()
    conns = {c.name: await connect(list(c.urls), name=f"kernel-{c.name}") for c in topo.cells}
    kernels = {
        cell: Kernel(nc, topology=topo, snapshots=store, cell=cell, holder=f"k-{cell}") for cell, nc in conns.items()
    }
    tasks = {cell: asyncio.create_task(k.run(stop)) for cell, k in kernels.items()}
    try:
        deadline = time.monotonic() + 60
        for p, e in direct + ingested:
            shard = shard_for(TENANT, p, "", SHARDS)
            while await folded(cell_js[owner[shard]], shard, e) < PER_EXECUTION:
                for cell, task in tasks.items():
                    assert not task.done(), f"kernel {cell} stopped: {task.exception() if task.done() else ''}"
                assert time.monotonic() < deadline, f"execution {e} (shard {shard}) not folded within 60s"
                await asyncio.sleep(0.05)
        assert {cell: k.shards for cell, k in kernels.items()} == {"east": [0, 1], "west": [2, 3]}
        leases = await cell_js["west"].key_value(LEASES_BUCKET)  # in east; read through the gateway
        assert {s: getattr(await lease_holder(leases, s, owner[s]), "holder", None) for s in owner} == {
            s: f"k-{cell}" for s, cell in owner.items()
        }

        # 3. One edge with the two-cell topology serves both cells' executions.
        app = create_app(
            topology=topo, snapshots=store, tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)]
        )
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://edge",
                headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
            ) as edge:  # fmt: skip
                for p, e in direct + ingested:
                    shard = shard_for(TENANT, p, "", SHARDS)
                    located = (await edge.get("/api/v1/locate", params={"tenant": TENANT, "project": p})).json()
                    assert (located["shard"], located["cell"]) == (shard, owner[shard])
                    served = await check_invariant(cell_js[owner[shard]], edge, TENANT, p, e)
                    assert served.event_count == PER_EXECUTION and served.execution_id == e
                missing = await edge.get(executions_url(TENANT, direct[2][0], "1"))
                assert missing.status_code == 404, missing.text
            assert app.state.edge.cells.connected() == {"east": True, "west": True}
        finally:
            await app.state.edge.cells.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 30)
        for nc in conns.values():
            await close(nc)
