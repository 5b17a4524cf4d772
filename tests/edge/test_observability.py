"""Read-path stages are traced with the execution id; every request is access-logged without its token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.producer import Producer
from natscluster.server import EmbeddedServer
from locator.ids import Snowflake
from locator import default_topology, new_event, shard_for
from projector.cache import KvProjectionCache
from projector.projection import decode_projection
from projector.snapshots import SnapshotStore

TOKEN = "obs-token-4f1c"


async def test_read_stages_are_spans_and_requests_are_logged(
    nats_server: EmbeddedServer, js: Any, tmp_path: Path, spans: InMemorySpanExporter, capsys: Any
) -> None:
    topology = default_topology(nats_url=nats_server.url)
    # An id no other test uses: spans and log lines left by earlier tests in this process are told apart by it.
    xid = Snowflake().next_str()
    await Producer(js, topology).publish(new_event(tenant="acme", project="web", execution_id=xid, type="execution.started"))
    app = create_app(
        topology=topology,
        tokens=[TokenSpec(name="t", role="read", tenants=("*",), token=TOKEN)],
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    capsys.readouterr()
    # Loggers may be cached from earlier tests (structlog caches on first use): read stderr.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        resp = await client.get(f"/api/v1/tenants/acme/projects/web/executions/{xid}", headers=headers)
        assert resp.status_code == 200 and resp.headers["x-noetl-source"] == "replay"
        cache = await KvProjectionCache.open(js, shard_for("acme", "web", "", 4))
        await cache.put(xid, decode_projection(resp.content), revision=None)
        warm = await client.get(f"/api/v1/tenants/acme/projects/web/executions/{xid}", headers=headers)
        assert warm.headers["x-noetl-source"] == "cache"
    await app.state.edge.cells.close()
    mine = [s for s in spans.get_finished_spans() if (s.attributes or {}).get("noetl.execution_id") == xid]
    names = [s.name for s in mine]
    # Cold: cache miss -> snapshot scan -> replay; warm: cache only.
    assert names.count("edge.read.cache") == 2 and "edge.read.snapshot" in names and names.count("edge.read.replay") == 1
    assert all(s.name.startswith("edge.read.") or s.name.startswith("wal.") for s in mine), names
    err = capsys.readouterr().err
    access = [line for line in err.splitlines() if "http.request" in line and xid in line]
    assert len(access) == 2, err
    for line in access:  # console or JSON rendering, depending on the configuration in force
        assert f"execution_id={xid}" in line or f'"execution_id": "{xid}"' in line
        assert "status=200" in line or '"status": 200' in line
        assert "/api/v1/tenants/{tenant}/projects/{project}/executions/{execution_id}" in line
    assert TOKEN not in err
