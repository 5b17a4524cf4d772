#!/usr/bin/env python
"""Cluster benchmark: publish-ack and fold rates on a 3-node R3 cluster against one R1 server, in one run.

What is measured
----------------
Two deployments run side by side for the whole run, each bootstrapped with
the default topology (4 shards):

* **baseline ``r1``** — one ``nats-server`` (``natscluster.server.EmbeddedServer``),
  streams and buckets with 1 replica (what ``noetl-edge up`` runs);
* **``r3``** — a 3-node cluster started exactly as ``noetl-edge cluster up``
  starts it (``natscluster.local.LocalCluster``: same configs, meta leader wait,
  bootstrap with 3 replicas), the client connected to all three URLs.

Rounds alternate r1, r3, r1, r3… (a warm-up round of each first, not
counted). A round on one deployment:

1. **publish** — N fresh ``user.bench`` events (fresh execution and event
   ids, 64 executions over 8 projects, so every shard gets some) through
   ``Producer.publish_many``; timed until every ack is back (an ack on R3
   means a quorum of 2 servers stored it). Rate = acked events / s.
2. **fold** — a ``kernel.runtime.Kernel`` running only ``system/project``
   is started on the deployment; timed from its start (leases, consumers)
   until the ``project_<shard>`` consumer of every shard has acked up to the
   WAL's last sequence. Rate = N / s. Then, not timed, every execution's
   projection in KV is checked to hold all of its events, and the kernel is
   stopped (it releases its leases).

Reported: medians (and per-round values) per deployment and the ratios
r3 / r1. Both deployments share this host's cores (2 here), so the R3 figure
includes three servers' replication work on the same CPUs: it is a cost
measurement, not a throughput ceiling of a real cluster with a core per node.

Usage: ``python bench/cluster.py [--quick] [--events N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nats.aio.client import Client as NATS  # noqa: E402

from bench.common import dist_version, nats_server_version  # noqa: E402
from edge.cli.cluster import bootstrap_when_ready  # noqa: E402
from kernel.bootstrap import StreamSettings  # noqa: E402
from natscluster.local import LocalCluster  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.host import system_manifests  # noqa: E402
from kernel.logs import configure_logging  # noqa: E402
from kernel.producer import Ack, Producer  # noqa: E402
from kernel.runtime import Kernel  # noqa: E402
from natscluster.server import EmbeddedServer  # noqa: E402
from locator import default_topology  # noqa: E402
from locator.envelope import new_event  # noqa: E402
from locator.shard import shard_for  # noqa: E402
from locator.subjects import proj_bucket, wal_stream  # noqa: E402
from locator.topology import Topology  # noqa: E402
from projector.projection import decode_projection  # noqa: E402
from projector.snapshots import SnapshotStore  # noqa: E402

TENANT = "bench"
PROJECTS = tuple(f"p{i}" for i in range(8))
EXECUTIONS = 64


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Deployment:
    """One connected, bootstrapped deployment and what a round needs."""

    def __init__(self, name: str, nc: NATS, topology: Topology, work: Path) -> None:
        self.name = name
        self.nc = nc
        self.js = nc.jetstream(timeout=30)
        self.topology = topology
        self.snapshots = SnapshotStore(f"file://{work / name / 'objects'}")
        self.ids = itertools.count(time.time_ns() // 1000)

    async def publish(self, n: int) -> tuple[float, dict[tuple[str, str], int]]:
        execs = [(PROJECTS[i % len(PROJECTS)], str(next(self.ids))) for i in range(EXECUTIONS)]
        envs = [
            new_event(tenant=TENANT, project=p, execution_id=e, type="user.bench", payload={"i": i})
            for i, (p, e) in zip(range(n), itertools.cycle(execs), strict=False)
        ]
        began = time.perf_counter()
        results = await Producer(self.js, self.topology).publish_many(envs)
        elapsed = time.perf_counter() - began
        bad = [r for r in results if not isinstance(r, Ack) or r.duplicate]
        if bad:
            raise RuntimeError(f"{self.name}: {len(bad)} events not acked: {bad[:3]}")
        counts: dict[tuple[str, str], int] = {}
        for env in envs:
            counts[(env.project, env.execution_id)] = counts.get((env.project, env.execution_id), 0) + 1
        return n / elapsed, counts

    async def folded(self) -> bool:
        for shard in range(self.topology.shard_count):
            last = (await self.js.stream_info(wal_stream(shard))).state.last_seq
            try:
                info = await self.js.consumer_info(wal_stream(shard), f"project_{shard}")
            except Exception:  # noqa: BLE001 - not created yet by the starting kernel
                return False
            if (info.ack_floor.stream_seq if info.ack_floor else 0) < last:
                return False
        return True

    async def fold(self, n: int, counts: dict[tuple[str, str], int], timeout: float = 300.0) -> float:
        stop = asyncio.Event()
        kernel = Kernel(self.nc, topology=self.topology, snapshots=self.snapshots,
                        manifests=system_manifests(["project"]), holder=f"bench-{self.name}")  # fmt: skip
        began = time.perf_counter()
        task = asyncio.create_task(kernel.run(stop))
        try:
            while not await self.folded():
                if task.done():
                    task.result()
                if time.perf_counter() - began > timeout:
                    raise RuntimeError(f"{self.name}: not folded within {timeout}s")
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - began
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        for (project, execution), expected in counts.items():
            kv = await self.js.key_value(proj_bucket(shard_for(TENANT, project, "", self.topology.shard_count)))
            entry = await kv.get(execution)
            got = decode_projection(entry.value or b"").event_count
            if got < expected:
                raise RuntimeError(f"{self.name}: {execution} folded {got} of {expected} events")
        return n / elapsed


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 1), "best": round(max(values), 1),
            "rounds": [round(v, 1) for v in values]}  # fmt: skip


async def measure(deployments: list[Deployment], args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, dict[str, list[float]]] = {d.name: {"publish": [], "fold": []} for d in deployments}
    for round_ in range(args.rounds + 1):
        for d in deployments:
            publish, counts = await d.publish(args.events)
            fold = await d.fold(args.events, counts)
            log(f"round {round_} {d.name}: publish {publish:,.0f}/s fold {fold:,.0f}/s")
            if round_:  # round 0 warms up
                rates[d.name]["publish"].append(publish)
                rates[d.name]["fold"].append(fold)
    out: dict[str, Any] = {d: {k: summary(v) for k, v in r.items()} for d, r in rates.items()}
    out["ratio_r3_over_r1"] = {
        k: round(out["r3"][k]["median"] / out["r1"][k]["median"], 3) for k in ("publish", "fold")
    }
    return out


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    settings = StreamSettings()
    single = EmbeddedServer(data_dir=work / "r1", topology=default_topology(), port=0)
    cluster = LocalCluster(work / "r3", nodes=3)
    single.start()
    try:
        cluster.save()
        cluster.start()
        cluster.wait_meta_leader()
        r1_topology = default_topology(nats_url=single.url)
        await bootstrap_when_ready([single.url], r1_topology, settings=settings)
        await bootstrap_when_ready(cluster.urls, cluster.topology, settings=settings)
        nc1 = await connect([single.url], name="bench-r1")
        nc3 = await connect(cluster.urls, name="bench-r3")
        try:
            result = await measure(
                [Deployment("r1", nc1, r1_topology, work), Deployment("r3", nc3, cluster.topology, work)], args
            )
        finally:
            await close(nc1)
            await close(nc3)
    finally:
        cluster.stop()
        single.stop()
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="publish-ack and fold events/s: 3-node R3 cluster vs one R1 server")
    p.add_argument("--events", type=int, default=20_000, help="events per round and deployment (default 20000)")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds per deployment (default 3)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2000 events, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 2000, 1
    if args.events < EXECUTIONS or args.rounds < 1:
        p.error(f"--events must be at least {EXECUTIONS} and --rounds at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="warning")
    with tempfile.TemporaryDirectory(prefix="noetl-bench-cluster-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    result = {
        "bench": "cluster", "events": args.events, "rounds": args.rounds, **result,
        "versions": {"nats_server": nats_server_version(), "nats_py": dist_version("nats-py"),
                     "python": platform.python_version()},
    }  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
