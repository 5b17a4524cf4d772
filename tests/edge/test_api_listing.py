"""``GET …/executions``: bad filters are 422 problems naming the parameter, the token's tenant scope holds, and an
empty project lists nothing (a real nats-server; the kernel is not needed for what is refused)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from natscluster.server import EmbeddedServer
from locator.topology import default_topology
from projector.listing import ListQuery, encode_token, Cursor
from projector.snapshots import SnapshotStore

READ_A = "tok-list-a-0c1d2e3f"
URL = "/api/v1/tenants/acme/projects/web/executions"


@pytest.fixture
async def client(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: Starlette = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[TokenSpec(name="a", role="read", tenants=("acme",), token=READ_A)],
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://edge", headers={"Authorization": f"Bearer {READ_A}"}
        ) as c:
            yield c
    finally:
        await app.state.edge.cells.close()


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["detail"]
    return body


async def test_an_empty_project_lists_nothing(client: httpx.AsyncClient) -> None:
    for params in ({}, {"status": "failed,RUNNING", "limit": "500"}, {"since": "2026-12-01T00:00:00Z", "until": "123456789012345678"},
                   {"playbook": "etl/daily"}, {"since": "2026-12-01 00:00:00+02:00"}):
        resp = await client.get(URL, params=params)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"executions": [], "next_page_token": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "DONE"}, "status"),
        ({"status": "FAILED,,nope"}, "status"),
        ({"playbook": "../etc"}, "playbook"),
        ({"playbook": "a" * 300}, "playbook"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-12-01T00:00:00"}, "since"),  # no zone: which hour it means is a guess
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"until": "99999999999999999999"}, "until"),
        ({"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "x" * 600}, "page_token"),
        ({"page_token": encode_token(Cursor(5, 0), ListQuery(tenant="acme", project="web", statuses=("FAILED",)))},
         "page_token"),  # issued for other filters
        ({"page_token": encode_token(Cursor(5, 0), ListQuery(tenant="other", project="web"))}, "page_token"),
    ],
)
async def test_bad_filters_are_422_naming_the_parameter(client: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    body = problem(await client.get(URL, params=params), 422)
    assert body["field"] == field, body


async def test_a_token_lists_its_own_tenants_only(client: httpx.AsyncClient) -> None:
    problem(await client.get("/api/v1/tenants/other/projects/web/executions"), 403)
    problem(await client.get(URL, headers={"Authorization": "Bearer wrong"}), 401)
    problem(await client.get("/api/v1/tenants/Bad.Name/projects/web/executions"), 422)
    ok = await client.get(URL, params={"page_token": encode_token(Cursor(5, 0), ListQuery(tenant="acme", project="web"))})
    assert ok.status_code == 200 and ok.json() == {"executions": [], "next_page_token": None}
