"""The 404 of an unknown execution, on every route that reads or writes one, says which affinity was asked
for (or that none was) and how to ask with one: an execution started with an affinity lives on the shard that
affinity picks, so asking without it (or with another) finds nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.producer import Ack, Producer
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.topology import default_topology
from projector.snapshots import SnapshotStore

ADMIN = "tok-admin-unknown-execution-31f0"
H = {"Authorization": f"Bearer {ADMIN}"}
BASE = "/api/v1/tenants/acme/projects/web/executions"
X = "7300000001"
# An affinity whose shard is not the one of no affinity: asked without it, X is on no shard the edge reads.
AFFINITY = next(a for a in ("eu", "us", "ap", "eu-2") if shard_for("acme", "web", a, 4) != shard_for("acme", "web", "", 4))
OTHER = next(a for a in ("us", "ap", "eu-2", "sa") if shard_for("acme", "web", a, 4) not in
             (shard_for("acme", "web", AFFINITY, 4), shard_for("acme", "web", "", 4)))

WITHOUT = f"unknown execution {X} of acme/web (asked without an affinity: if it was started with one, ask with ?affinity=<a>)"
WITH_OTHER = (f"unknown execution {X} of acme/web with affinity {OTHER!r} "
              "(an execution is found only with the affinity it was started with)")


@pytest.fixture
async def client(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    topology = default_topology(nats_url=nats_server.url)
    ack = await Producer(js, topology).publish(
        new_event(tenant="acme", project="web", execution_id=X, affinity=AFFINITY, type="execution.started")
    )
    assert isinstance(ack, Ack)
    app: Starlette = create_app(
        topology=topology, tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)],
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
            yield c
    finally:
        await app.state.edge.cells.close()


ROUTES = [
    ("GET", f"{BASE}/{X}", ""),
    ("GET", f"{BASE}/{X}/events", ""),
    ("GET", f"{BASE}/{X}/timeline", ""),
    ("GET", f"{BASE}/{X}/stream", ""),
    ("GET", f"{BASE}/{X}/steps/fetch/result", ""),
    ("POST", f"{BASE}/{X}/cancel", ""),
    ("POST", f"{BASE}/{X}/events", "; start it first"),
]


@pytest.mark.parametrize(("method", "path", "then"), ROUTES, ids=[f"{m} {p.removeprefix(BASE)}" for m, p, _ in ROUTES])
async def test_the_404_says_how_to_ask_with_an_affinity(client: httpx.AsyncClient, method: str, path: str, then: str) -> None:
    body = {"type": "user.note"} if path.endswith("/events") and method == "POST" else None
    # With its affinity the execution is there (cancel and publish write: they are checked last).
    if method == "GET" and not path.endswith("/stream"):  # an SSE stream of a known execution never ends
        found = await client.request(method, path, params={"affinity": AFFINITY}, headers=H)
        assert found.status_code == (404 if path.endswith("/result") else 200), found.text
        if path.endswith("/result"):  # a known execution without that step: not the unknown-execution 404
            assert found.json()["detail"] == f"execution {X} has no step 'fetch'"
    without = await client.request(method, path, json=body, headers=H)
    assert without.status_code == 404, without.text
    assert without.headers["content-type"].startswith("application/problem+json")
    assert without.json()["detail"] == WITHOUT + then
    other = await client.request(method, path, params={"affinity": OTHER}, json=body, headers=H)
    assert other.status_code == 404 and other.json()["detail"] == WITH_OTHER + then
    if method == "POST":
        done = await client.request(method, path, params={"affinity": AFFINITY}, json=body, headers=H)
        assert done.status_code in (200, 202), done.text


async def test_an_execution_the_edge_has_met_takes_events_without_a_lookup_and_stays_tenant_scoped(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    started = await client.post(BASE, json={}, headers=H)
    assert started.status_code == 202, started.text
    fresh = started.json()["execution_id"]
    shard = shard_for("acme", "web", "", 4)
    # Its history gone from where a lookup would find it: only what the edge remembers says it exists.
    await js.purge_stream(f"WAL_{shard}")
    sent = await client.post(f"{BASE}/{fresh}/events", json={"type": "user.note"}, headers=H)
    assert sent.status_code == 200, sent.text
    # Found once through the WAL, then remembered: X takes events with its affinity after its WAL is purged too.
    assert (await client.post(f"{BASE}/{X}/events", params={"affinity": AFFINITY}, json={"type": "user.note"}, headers=H)).status_code == 200
    await js.purge_stream(f"WAL_{shard_for('acme', 'web', AFFINITY, 4)}")
    again = await client.post(f"{BASE}/{X}/events", params={"affinity": AFFINITY}, json={"type": "user.note"}, headers=H)
    assert again.status_code == 200, again.text
    # Remembered as acme/web's: the same id under another project is looked up, and unknown there.
    other = await client.post(f"/api/v1/tenants/acme/projects/app/executions/{fresh}/events", json={"type": "user.note"}, headers=H)
    assert other.status_code == 404, other.text
