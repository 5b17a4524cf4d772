#!/usr/bin/env python
"""Cost of the per-pool gauges on a ``/metrics`` scrape, against the same scrape without them, in one run.

What is measured
----------------
One ``nats-server`` (``natscluster.server.EmbeddedServer``) is bootstrapped with the
default topology (4 shards). On every shard, ``--pools`` worker pools each get
``--commands`` stored commands on ``cmd.<shard>.<pool>`` and their durable
consumer ``workers_<pool>`` (as a worker creates it), and one command in
``cmd.<shard>.timer``, so the per-subject counts and the consumer listing have
something to report.

Then rounds alternate:

* **baseline** — ``EdgeMetrics.refresh`` over every shard with the pool gauges
  switched off: what a scrape cost before pools (WAL, KV, DLQ, CMD and lag
  figures);
* **pools** — the same refresh with the pool gauges (the per-subject counts
  come with the ``STREAM.INFO`` of ``CMD_<shard>`` either way; one consumer
  listing more per shard).

Each phase times ``--scrapes`` refreshes; a warm-up round is not counted. The
result is scrapes per second per phase (median and best over the rounds) and
the ratio pools / baseline on the medians. The pool figures of the last scrape
are checked against what was stored, so a wrong count aborts the run.

The single JSON result goes to stdout, with the load average at the start and
the end (the machine may be shared); progress goes to stderr.

Usage: ``python bench/pools.py [--pools P] [--commands C] [--scrapes S] [--rounds R] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402

from bench.common import dist_version, nats_server_version  # noqa: E402
from edge.metrics import EdgeMetrics  # noqa: E402
from kernel.bootstrap import bootstrap  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.logs import configure_logging  # noqa: E402
from natscluster.server import EmbeddedServer  # noqa: E402
from locator.subjects import cmd_stream, cmd_subject, pool_consumer  # noqa: E402
from locator.topology import default_topology  # noqa: E402

SHARDS = 4


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


async def fill(js: JetStreamContext, pools: list[str], commands: int) -> None:
    for shard in range(SHARDS):
        for pool in pools:
            for n in range(commands):
                await js.publish(cmd_subject(shard, pool), b"{}", headers={"Nats-Msg-Id": f"{shard}:{pool}:{n}"})
            config = ConsumerConfig(durable_name=pool_consumer(pool), ack_policy=AckPolicy.EXPLICIT,
                                    filter_subject=cmd_subject(shard, pool))
            await js.add_consumer(cmd_stream(shard), config)
        await js.publish(cmd_subject(shard, "timer"), b"{}", headers={"Nats-Msg-Id": f"{shard}:timer"})


async def scrapes(metrics: EdgeMetrics, js: JetStreamContext, n: int) -> float:
    """Scrapes per second over ``n`` refreshes of every shard."""

    async def js_for_shard(shard: int) -> JetStreamContext:
        return js

    started = time.perf_counter()
    for _ in range(n):
        await metrics.refresh(js_for_shard, range(SHARDS))
    return n / (time.perf_counter() - started)


def check(metrics: EdgeMetrics, pools: list[str], commands: int) -> None:
    for shard in range(SHARDS):
        for pool in pools:
            pending = metrics.pool_pending.labels(str(shard), pool)._value.get()
            undelivered = metrics.pool_undelivered.labels(str(shard), pool)._value.get()
            if (pending, undelivered) != (commands, commands):
                raise SystemExit(f"shard {shard} pool {pool}: pending {pending}, undelivered {undelivered}, "
                                 f"expected {commands}")
        if metrics.up.labels(str(shard))._value.get() != 1:
            raise SystemExit(f"shard {shard} did not answer the scrape")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    pools = [f"pool{n}" for n in range(args.pools)]
    with tempfile.TemporaryDirectory(prefix="noetl-bench-pools-") as tmp:
        topology = default_topology(shard_count=SHARDS)
        server = EmbeddedServer(data_dir=Path(tmp) / "data", topology=topology, port=0)
        server.start()
        try:
            nc = await connect([server.url], name="bench-pools")
            try:
                js = nc.jetstream()
                await bootstrap(js, topology)
                await fill(js, pools, args.commands)
                plain, with_pools = EdgeMetrics(), EdgeMetrics()

                async def no_pools(js: JetStreamContext, shard: int, subjects: dict[str, int]) -> None:
                    return None

                plain._refresh_pools = no_pools  # type: ignore[method-assign]
                rates: dict[str, list[float]] = {"baseline": [], "pools": []}
                for r in range(args.rounds + 1):
                    base = await scrapes(plain, js, args.scrapes)
                    pooled = await scrapes(with_pools, js, args.scrapes)
                    if r == 0:
                        log(f"warm-up: baseline {base:.0f}/s, pools {pooled:.0f}/s")
                        continue
                    rates["baseline"].append(base)
                    rates["pools"].append(pooled)
                    log(f"round {r}: baseline {base:.0f}/s, pools {pooled:.0f}/s")
                check(with_pools, pools, args.commands)
            finally:
                await close(nc)
        finally:
            server.stop()

    def stats(values: list[float]) -> dict[str, Any]:
        return {"median": round(statistics.median(values), 1), "best": round(max(values), 1),
                "rounds": [round(v, 1) for v in values]}

    base_median, pools_median = statistics.median(rates["baseline"]), statistics.median(rates["pools"])
    return {
        "bench": "pools", "quick": args.quick, "shards": SHARDS, "pools": args.pools, "commands_per_pool": args.commands,
        "scrapes_per_round": args.scrapes, "rounds": args.rounds, "warmup_rounds": 1,
        "baseline_scrapes_per_s": stats(rates["baseline"]), "pools_scrapes_per_s": stats(rates["pools"]),
        "ratio": pools_median / base_median,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "python": platform.python_version(), "nats_py": dist_version("nats-py"), "nats_server": nats_server_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pools", type=int, default=8, help="worker pools per shard (default 8)")
    p.add_argument("--commands", type=int, default=50, help="stored commands per pool and shard (default 50)")
    p.add_argument("--scrapes", type=int, default=50, help="refreshes of every shard per phase (default 50)")
    p.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    p.add_argument("--quick", action="store_true", help="a small run: 2 pools, 3 commands, 3 scrapes, 1 round")
    args = p.parse_args()
    configure_logging(level="warning")  # stdout holds the JSON document only
    if args.quick:
        args.pools, args.commands, args.scrapes, args.rounds = 2, 3, 3, 1
    print(json.dumps(asyncio.run(run(args)), sort_keys=True))


if __name__ == "__main__":
    main()
