"""Edge cases found by review: stale snapshots get their WAL tail, SSE 404, start-up refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from edge.app import create_app
from edge.auth import Authenticator, TokenSpec
from kernel.errors import ConfigError
from kernel.host import context_for, load_plugin, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from natscluster.server import EmbeddedServer, free_port
from locator import default_topology, new_event, shard_for
from projector.cache import KvProjectionCache
from projector.projection import canonical, decode_projection
from projector.replay import replay
from projector.snapshots import SnapshotStore

TOKEN = "edge-cases-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SHARD = shard_for("acme", "web", "", 4)


def ev(type: str, **kw: Any) -> Any:
    return new_event(tenant="acme", project="web", execution_id="61", type=type, **kw)


async def test_a_snapshot_older_than_the_wal_is_served_with_its_tail(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, pump_until: Any
) -> None:
    topology = default_topology(nats_url=nats_server.url)
    store = SnapshotStore(f"file://{tmp_path}/objects")
    producer = Producer(js, topology)
    await producer.publish_many([ev("execution.started"), ev("execution.completed")])
    cache = await KvProjectionCache.open(js, SHARD)
    pumps = []
    for manifest in system_manifests():
        ctx = context_for(manifest, SHARD, cache=cache, snapshots=store)
        pumps.append(Pump(js, shard=SHARD, shard_count=4, plugin=load_plugin(manifest), ctx=ctx,
                          consumer=manifest.consumer, source=manifest.source, linger=0.1, fetch_wait=0.2))

    async def pointed() -> bool:
        entry = await cache.get("61")
        return entry is not None and entry.pointer is not None

    await pump_until(pumps, pointed)
    late = await producer.publish(ev("user.late"))  # no kernel runs now: KV still points at the old snapshot
    app = create_app(topology=topology, tokens=[TokenSpec(name="t", role="admin", tenants=("*",), token=TOKEN)], snapshots=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            resp = await client.get("/api/v1/tenants/acme/projects/web/executions/61", headers=HEADERS)
            assert resp.status_code == 200 and resp.headers["x-noetl-source"] == "replay"
            served = decode_projection(resp.content)
            assert served.last_seq == late.seq and served.event_count == 3
            fresh = await replay(js, shard=SHARD, shard_count=4, tenant="acme", project="web", execution_id="61")
            assert fresh is not None and canonical(served) == canonical(fresh)

            sse = await client.get("/api/v1/tenants/acme/projects/web/executions/999/stream", headers=HEADERS)
            assert sse.status_code == 404 and sse.headers["content-type"] == "application/problem+json"
    finally:
        await app.state.edge.cells.close()


def test_a_bad_sha256_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="64 hex digits"):
        Authenticator([TokenSpec(name="x", role="read", tenants=("*",), sha256="zz" * 32)])


def _edge(cli_command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli_command, "edge", *args], capture_output=True, text=True, env=env, timeout=60)


def test_edge_refuses_a_busy_or_zero_port_and_a_wrong_shard_count(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str]
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    common = ["--nats-url", nats_server.url, "--data-dir", str(tmp_path)]
    busy = _edge(cli_command, cli_environ, "--bind", f"127.0.0.1:{nats_server.port}", *common)
    assert busy.returncode == 1 and "already in use" in busy.stderr and "Traceback" not in busy.stderr
    zero = _edge(cli_command, cli_environ, "--bind", "127.0.0.1:0", *common)
    assert zero.returncode == 2 and "fixed port" in zero.stderr
    wrong = _edge(cli_command, cli_environ, "--bind", f"127.0.0.1:{free_port()}", "--shards", "8", *common)
    assert wrong.returncode == 2 and "bootstrapped for 4 shards" in wrong.stderr and "Traceback" not in wrong.stderr
