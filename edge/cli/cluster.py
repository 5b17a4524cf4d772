"""``noetl-edge cluster up|status|down|bootstrap|replicas``: a local N-node NATS cluster, and replica counts.

``up`` starts the nodes (detached: they outlive the command), waits for a
JetStream meta leader, bootstraps the topology with the cluster's replica
count and prints one ``node`` line per server, then ``ready <url,url,…>
<data-dir>/topology.yaml``. ``down`` stops what ``up`` recorded in
``<data-dir>/cluster.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.js.errors import APIError, ServiceUnavailableError

from edge.cli.options import default_data_dir, resolve_topology
from kernel.bootstrap import BootstrapReport, StreamSettings, bootstrap
from natscluster.local import TOPOLOGY_FILE, LocalCluster
from natscluster.status import ClusterStatus, node_statuses, stream_statuses
from kernel.connect import close, connect
from kernel.errors import ConfigError, KernelError
from natscluster.replicas import set_replicas
from locator.topology import Topology

_TRANSIENT = (ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError)


def cluster_dir(args: argparse.Namespace) -> Path:
    """``--data-dir``, else ``<default data dir>/cluster``."""
    return Path(args.data_dir) if args.data_dir else default_data_dir() / "cluster"


async def bootstrap_when_ready(
    urls: list[str], topology: Topology, *, settings: StreamSettings, timeout: float = 30.0
) -> BootstrapReport:
    """Bootstrap, retrying while a freshly elected cluster still answers "JetStream unavailable"."""
    nc = await connect(urls, name="noetl-cluster-bootstrap")
    try:
        js = nc.jetstream(timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await bootstrap(js, topology, settings=settings)
            except (*_TRANSIENT, APIError) as e:
                # 503: no quorum yet; 500: e.g. "insufficient resources" while peers are still being learned.
                if isinstance(e, APIError) and e.code not in (500, 503):
                    raise KernelError(f"bootstrap refused by the server: {e.description}") from e
                if time.monotonic() > deadline:
                    raise KernelError(f"JetStream not available for bootstrap after {timeout:.0f}s: {e!r}") from e
                await asyncio.sleep(0.25)
    finally:
        await close(nc)


def _up(args: argparse.Namespace) -> int:
    data_dir = cluster_dir(args)
    settings = StreamSettings.from_env()
    cluster = LocalCluster(
        data_dir, nodes=args.nodes, shard_count=args.shards, replicas=args.replicas,
        max_payload=settings.server_max_payload,
    )  # fmt: skip
    if args.replicas is not None and args.replicas != cluster.state.replicas:
        raise ConfigError(
            f"{data_dir} runs {cluster.state.replicas} replicas, not {args.replicas} "
            f"(change it explicitly: `noetl-edge cluster replicas {args.replicas} --data-dir {data_dir}`)"
        )
    cluster.save()
    cluster.start(timeout=args.timeout)
    cluster.wait_meta_leader(timeout=args.timeout)
    report = asyncio.run(bootstrap_when_ready(cluster.urls, cluster.topology, settings=settings, timeout=args.timeout))
    for spec in cluster.state.nodes:
        print(f"node {spec.name} {spec.client_url} {spec.monitor_url}", flush=True)
    print(f"bootstrap created={len(report.created)} unchanged={len(report.unchanged)} replicas={cluster.state.replicas}")
    print(f"ready {','.join(cluster.urls)} {data_dir / TOPOLOGY_FILE}", flush=True)
    return 0


async def gather_status(cluster: LocalCluster) -> ClusterStatus:
    nodes = node_statuses(cluster)
    # Every running node, not only the healthy ones: /healthz is "unavailable" on all of them while new replicas
    # catch up (e.g. right after `cluster replicas 3`), which is when the stream table matters most.
    urls = [n.client_url for n in nodes if n.pid is not None]
    if not urls:
        return ClusterStatus(nodes=nodes, streams=[], consumers=[])
    nc = await connect(urls, name="noetl-cluster-status")
    try:
        streams, consumers = await stream_statuses(nc.jetstream(timeout=5))
    finally:
        await close(nc)
    return ClusterStatus(nodes=nodes, streams=streams, consumers=consumers)


def _status(args: argparse.Namespace) -> int:
    cluster = LocalCluster.existing(cluster_dir(args))
    status = asyncio.run(gather_status(cluster))
    if args.json:
        print(msgspec.json.encode(status).decode())
    else:
        from edge.cli.cluster_tables import print_status

        print_status(status)
    return 0 if all(n.healthy for n in status.nodes) else 1


def _down(args: argparse.Namespace) -> int:
    cluster = LocalCluster.existing(cluster_dir(args))
    stopped = cluster.stop(timeout=args.timeout)
    print(f"stopped {','.join(stopped) or 'nothing (no node was running)'}")
    return 0


def _target(args: argparse.Namespace) -> tuple[list[str], Topology, LocalCluster | None]:
    """The local cluster of --data-dir unless a topology or NATS URL is given (flag or environment)."""
    explicit = args.topology or args.nats_url or os.environ.get("NOETL_TOPOLOGY") or os.environ.get("NOETL_NATS_URL")
    if not explicit:
        cluster = LocalCluster.existing(cluster_dir(args))
        return cluster.urls, cluster.topology, cluster
    topology = resolve_topology(args)
    return ([args.nats_url] if args.nats_url else list(topology.cells[0].urls)), topology, None


def _bootstrap(args: argparse.Namespace) -> int:
    urls, topology, _ = _target(args)
    report = asyncio.run(bootstrap_when_ready(urls, topology, settings=StreamSettings.from_env(), timeout=args.timeout))
    print(f"bootstrap created={len(report.created)} unchanged={len(report.unchanged)} replicas={topology.replicas}")
    return 0


def _replicas(args: argparse.Namespace) -> int:
    urls, topology, cluster = _target(args)

    async def change() -> None:
        nc = await connect(urls, name="noetl-cluster-replicas")
        try:
            for c in await set_replicas(nc.jetstream(timeout=30), topology, args.count):
                print(f"{c.stream} {c.before} -> {c.after}", flush=True)
        finally:
            await close(nc)

    asyncio.run(change())
    if cluster is not None:
        cluster.state.replicas = args.count
        cluster.save()
    return 0


ACTIONS = {"up": _up, "status": _status, "down": _down, "bootstrap": _bootstrap, "replicas": _replicas}


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)
