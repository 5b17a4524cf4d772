"""``/metrics`` shows the commands of every worker pool per shard, read from a real nats-server at each scrape.

The e2e test (tests/e2e/test_pools.py) scrapes the same gauges while real workers serve one pool and not another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from starlette.applications import Starlette

from natscluster.server import EmbeddedServer
from locator.subjects import cmd_stream, cmd_subject, pool_consumer
from locator.topology import default_topology
from tests.edge.test_api_routes import client_for, make_app

POOL_GAUGES = ("noetl_pool_pending", "noetl_pool_undelivered", "noetl_pool_unacked", "noetl_pool_pull_requests")


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = make_app(default_topology(nats_url=nats_server.url), tmp_path)
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


async def pools(client: httpx.AsyncClient) -> dict[tuple[str, str], tuple[float, ...]]:
    """(shard, pool) -> (pending, undelivered, unacked, pull requests), from one scrape."""
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    found: dict[tuple[str, str], dict[str, float]] = {}
    for line in resp.text.splitlines():
        name, brace, rest = line.partition("{")
        if name in POOL_GAUGES and brace:
            labels, _, value = rest.rpartition("} ")
            parsed = dict(part.split("=", 1) for part in labels.split(","))
            key = (parsed["shard"].strip('"'), parsed["pool"].strip('"'))
            found.setdefault(key, {})[name] = float(value)
    return {key: tuple(g[n] for n in POOL_GAUGES) for key, g in found.items()}


async def consumer(js: JetStreamContext, shard: int, pool: str) -> JetStreamContext.PullSubscription:
    """The pool's durable consumer, as a worker creates it."""
    config = ConsumerConfig(durable_name=pool_consumer(pool), ack_policy=AckPolicy.EXPLICIT,
                            filter_subject=cmd_subject(shard, pool), ack_wait=60)
    await js.add_consumer(cmd_stream(shard), config)
    return await js.pull_subscribe_bind(pool_consumer(pool), stream=cmd_stream(shard))


async def test_metrics_show_each_pool_s_commands_per_shard(app: Starlette, js: JetStreamContext) -> None:
    for n in range(2):  # two commands for gpu on shard 0, which no worker serves (no consumer at all)
        await js.publish(cmd_subject(0, "gpu"), b"{}", headers={"Nats-Msg-Id": f"gpu-{n}"})
    for n in range(3):
        await js.publish(cmd_subject(1, "cpu"), b"{}", headers={"Nats-Msg-Id": f"cpu-{n}"})
    await js.publish(cmd_subject(1, "timer"), b"{}", headers={"Nats-Msg-Id": "timer-0"})  # the scheduler's, no pool
    cpu = await consumer(js, 1, "cpu")
    held = await cpu.fetch(1, timeout=5)  # a cpu worker runs one of the three
    idle = await consumer(js, 2, "idle")  # a pool with workers and nothing to do

    async with client_for(app) as client:
        seen = await pools(client)
        assert seen[("0", "gpu")] == (2, 2, 0, 0)
        assert seen[("1", "cpu")] == (3, 2, 1, 0)
        assert seen[("2", "idle")] == (0, 0, 0, 0)
        assert not any(pool == "timer" for _, pool in seen)
        assert ("1", "gpu") not in seen  # pools are reported where they have a command or a consumer

        # An idle worker's pull request waiting for a command shows; bounded poll, no timing asserted.
        waiting = asyncio.create_task(idle.fetch(1, timeout=20))
        try:
            for _ in range(200):
                if (await pools(client))[("2", "idle")][3] == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the idle pool's pull request never showed")
        finally:
            waiting.cancel()

        await held[0].ack_sync()
        gpu = await consumer(js, 0, "gpu")  # a gpu worker at last: it takes both and finishes them
        for msg in await gpu.fetch(2, timeout=5):
            await msg.ack_sync()
        seen = await pools(client)
        assert seen[("1", "cpu")] == (2, 2, 0, 0)
        assert seen[("0", "gpu")] == (0, 0, 0, 0)  # drained: 0, not its last figures
