"""Bearer-token auth at the edge (roles, tenant scopes, sha256-configured tokens), the token never
leaking, and the response scrub on projections and event pages."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.errors import ConfigError
from kernel.producer import Producer
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.topology import Topology, default_topology
from projector.snapshots import SnapshotStore

BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"

ADMIN = "tok-ADMIN-9f2c41d7e0"
WRITER = "tok-WRITER-3a8b6c1f52"
READER = "tok-READER-7e4d0a9b13"
STAR_READER = "tok-STARREAD-c5f19e2a88"
HASHED = "tok-HASHED-1b7e33c0d4"
OTHER_ADMIN = "tok-OTHERADM-5d6e7f8091"
ALL_TOKENS = (ADMIN, WRITER, READER, STAR_READER, HASHED, OTHER_ADMIN)

TOKENS = [
    TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN),
    TokenSpec(name="acme-writer", role="write", tenants=("acme",), token=WRITER),
    TokenSpec(name="acme-reader", role="read", tenants=("acme",), token=READER),
    TokenSpec(name="star-reader", role="read", tenants=("*",), token=STAR_READER),
    TokenSpec(name="hashed", role="write", tenants=("acme", "globex"), sha256=hashlib.sha256(HASHED.encode()).hexdigest()),
    TokenSpec(name="initech-admin", role="admin", tenants=("initech",), token=OTHER_ADMIN),
]

SECRETS = ("hunter2", "k-123", "s3cret")
SECRET_PAYLOAD = {"password": "hunter2", "api_key": "k-123", "note": "see postgres://bob:s3cret@db/x", "rows": 3, "user": "bob"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def url(tenant: str, execution_id: str | None = None, suffix: str = "", project: str = "web") -> str:
    out = BASE.format(tenant=tenant, project=project)
    return out if execution_id is None else f"{out}/{execution_id}{suffix}"


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body) and body["status"] == status
    assert body["instance"] == resp.request.url.path
    return body


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=TOKENS,
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
        min_seq_wait=1.0,
    )
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


class Recorder(httpx.AsyncClient):
    """An ASGI client that keeps every response, so a test can search them all for a token."""

    def __init__(self, app: Starlette) -> None:
        super().__init__(transport=httpx.ASGITransport(app=app), base_url="http://edge")
        self.seen: list[httpx.Response] = []

    async def send(self, request: httpx.Request, **kw: Any) -> httpx.Response:
        resp = await super().send(request, **kw)
        await resp.aread()
        self.seen.append(resp)
        return resp

    def transcript(self) -> str:
        return "\n".join(
            "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + "\n" + r.text for r in self.seen
        )


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[Recorder]:
    async with Recorder(app) as c:
        yield c


async def start_as(client: httpx.AsyncClient, tenant: str, token: str = ADMIN) -> str:
    resp = await client.post(url(tenant), json={"workload": {"k": 1}}, headers=bearer(token))
    assert resp.status_code == 202, resp.text
    x: str = resp.json()["execution_id"]
    return x


async def operations(client: httpx.AsyncClient, tenant: str, x: str, headers: dict[str, str]) -> dict[str, int]:
    """The status of every authenticated operation on ``tenant``'s execution ``x``."""
    return {
        "start": (await client.post(url(tenant), json={}, headers=headers)).status_code,
        "publish": (await client.post(url(tenant, x, "/events"), json={"type": "user.a"}, headers=headers)).status_code,
        "get": (await client.get(url(tenant, x), headers=headers)).status_code,
        "events": (await client.get(url(tenant, x, "/events"), headers=headers)).status_code,
        "locate": (await client.get("/api/v1/locate", params={"tenant": tenant, "project": "web"}, headers=headers)).status_code,
    }


READ_ONLY = {"start": 403, "publish": 403, "get": 200, "events": 200, "locate": 200}
READ_WRITE = {"start": 202, "publish": 200, "get": 200, "events": 200, "locate": 200}
NOTHING = {"start": 403, "publish": 403, "get": 403, "events": 403, "locate": 200}  # locate reveals no tenant data

MATRIX = [
    # token, tenant, expected
    (ADMIN, "acme", READ_WRITE),
    (ADMIN, "globex", READ_WRITE),
    (WRITER, "acme", READ_WRITE),
    (WRITER, "globex", NOTHING),
    (READER, "acme", READ_ONLY),
    (READER, "globex", NOTHING),
    (STAR_READER, "acme", READ_ONLY),
    (STAR_READER, "globex", READ_ONLY),
    (HASHED, "acme", READ_WRITE),
    (HASHED, "globex", READ_WRITE),
    (HASHED, "initech", NOTHING),
    (OTHER_ADMIN, "acme", NOTHING),
    (OTHER_ADMIN, "initech", READ_WRITE),
]


async def test_auth_matrix(client: Recorder, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    executions = {t: await start_as(client, t) for t in ("acme", "globex", "initech")}
    for token, tenant, expected in MATRIX:
        got = await operations(client, tenant, executions[tenant], bearer(token))
        assert got == expected, (token.split("-")[1], tenant)
    # The scheme is case-insensitive; surrounding spaces in the token are tolerated.
    assert (await client.get(url("acme", executions["acme"]), headers={"Authorization": f"bearer {READER}"})).status_code == 200
    assert (await client.get(url("acme", executions["acme"]), headers={"Authorization": f"BEARER  {READER} "})).status_code == 200

    forbidden = assert_problem(await client.post(url("acme"), json={}, headers=bearer(READER)), 403)
    assert "acme-reader" in forbidden["detail"] and "read" in forbidden["detail"]
    forbidden = assert_problem(await client.get(url("globex", executions["globex"]), headers=bearer(WRITER)), 403)
    assert "globex" in forbidden["detail"]

    assert_no_token_anywhere(client, capsys, caplog)


BAD_HEADERS: list[tuple[dict[str, str], str]] = [
    ({}, "Bearer"),
    ({"Authorization": ""}, "Bearer"),
    ({"Authorization": "Bearer"}, "Bearer"),
    ({"Authorization": "Bearer    "}, "Bearer"),
    ({"Authorization": f"Basic {READER}"}, "Bearer"),
    ({"Authorization": READER}, "Bearer"),
    ({"Authorization": f"Token {READER}"}, "Bearer"),
    ({"Authorization": "Bearer not-a-real-token"}, 'Bearer error="invalid_token"'),
    ({"Authorization": f"Bearer {READER}x"}, 'Bearer error="invalid_token"'),
    ({"Authorization": f"Bearer {hashlib.sha256(HASHED.encode()).hexdigest()}"}, 'Bearer error="invalid_token"'),
]


async def test_unauthenticated_requests_are_401(
    client: Recorder, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    x = await start_as(client, "acme")
    for headers, challenge in BAD_HEADERS:
        got = await operations(client, "acme", x, headers)
        assert got == dict.fromkeys(got, 401), headers
        resp = await client.get(url("acme", x), headers=headers)
        body = assert_problem(resp, 401)
        assert resp.headers["www-authenticate"] == challenge, headers
        assert body["title"] == "Unauthorized"
    # 401 comes before 404: an unknown execution is not revealed to a stranger.
    assert_problem(await client.get(url("acme", "424242")), 401)
    assert_problem(await client.post(url("acme", "424242", "/events"), json={"type": "user.a"}), 401)
    # Health, readiness and metrics are open (probes and scrapers carry no token).
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status_code == 200
    assert_no_token_anywhere(client, capsys, caplog)


def test_the_edge_never_runs_open(tmp_path: Path) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    with pytest.raises(ConfigError, match="no API tokens"):
        create_app(topology=default_topology(), tokens=[], snapshots=store)
    with pytest.raises(ConfigError, match="exactly one"):
        create_app(topology=default_topology(), snapshots=store,
                   tokens=[TokenSpec(name="x", role="read", tenants=("*",), token="a", sha256="00" * 32)])
    with pytest.raises(ConfigError, match="64 hex"):
        create_app(topology=default_topology(), snapshots=store,
                   tokens=[TokenSpec(name="x", role="read", tenants=("*",), sha256="abcd")])
    with pytest.raises(ConfigError, match="tenants"):
        create_app(topology=default_topology(), snapshots=store,
                   tokens=[TokenSpec(name="x", role="read", tenants=(), token="a")])


def assert_no_token_anywhere(client: Recorder, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    captured = capsys.readouterr()
    texts = {"responses": client.transcript(), "stdout": captured.out, "stderr": captured.err, "logging": caplog.text}
    assert client.seen
    for token in ALL_TOKENS:
        for where, text in texts.items():
            assert token not in text, f"a token leaked into {where}"
            assert token.lower() not in text.lower(), f"a token leaked into {where}"


# --- scrub --------------------------------------------------------------------------------------


async def test_secrets_are_scrubbed_from_projections_and_event_pages(
    client: Recorder, js: JetStreamContext, topology: Topology
) -> None:
    # Through the edge: secrets in the workload, a step result, a call error and a user event.
    resp = await client.post(url("acme"), json={"workload": {"db": dict(SECRET_PAYLOAD), "n": 1}}, headers=bearer(WRITER))
    assert resp.status_code == 202
    x = resp.json()["execution_id"]
    assert not any(s in resp.text for s in SECRETS)
    docs = [
        {"type": "step.enter", "step": "load", "attempt": 1},
        {"type": "call.error", "step": "load", "attempt": 1, "payload": {"error": dict(SECRET_PAYLOAD)}},
        {"type": "step.exit", "step": "load", "attempt": 2, "payload": {"result": dict(SECRET_PAYLOAD)}},
        {"type": "user.creds", "payload": dict(SECRET_PAYLOAD)},
    ]
    posted = await client.post(url("acme", x, "/events"), json=docs, headers=bearer(WRITER))
    assert posted.status_code == 200 and not any(s in posted.text for s in SECRETS)

    # Straight through NATS, bypassing the edge.
    producer = Producer(js, topology)
    via_nats = "9100000001"
    for env in (
        new_event(tenant="acme", project="web", execution_id=via_nats, type="execution.requested",
                  payload={"playbook": {"path": "p", "version": 1}, "workload": dict(SECRET_PAYLOAD)}),
        new_event(tenant="acme", project="web", execution_id=via_nats, type="step.exit", step="s", attempt=1,
                  payload={"result": {"inner": dict(SECRET_PAYLOAD)}}),
        new_event(tenant="acme", project="web", execution_id=via_nats, type="user.creds", payload=dict(SECRET_PAYLOAD)),
        new_event(tenant="acme", project="web", execution_id=via_nats, type="execution.failed",
                  payload={"error": "connect postgres://bob:s3cret@db/x failed; password=hunter2"}),
    ):
        last = await producer.publish(env)
    # The WAL keeps what was written (the scrub is at the response boundary only).
    shard = shard_for("acme", "web", "", 4)
    assert b"hunter2" in ((await js.get_msg(f"WAL_{shard}", last.seq)).data or b"")

    for execution_id in (x, via_nats):
        for params in ({}, {"as_of_seq": last.seq}, {"min_seq": 1}):
            projection = await client.get(url("acme", execution_id), params=params, headers=bearer(READER))
            assert projection.status_code == 200, projection.text
            assert not any(s in projection.text for s in SECRETS), projection.text
        events = await client.get(url("acme", execution_id, "/events"), headers=bearer(READER))
        assert events.status_code == 200
        assert not any(s in events.text for s in SECRETS), events.text
        paged = await client.get(url("acme", execution_id, "/events"), params={"limit": 1, "after_seq": 1}, headers=bearer(READER))
        assert not any(s in paged.text for s in SECRETS)

    masked = {"password": "***", "api_key": "***", "note": "see postgres://bob:***@db/x", "rows": 3, "user": "bob"}
    p = (await client.get(url("acme", x), headers=bearer(READER))).json()
    assert p["workload"] == {"db": masked, "n": 1}
    assert p["steps"]["load"]["result"] == masked and p["steps"]["load"]["status"] == "COMPLETED"
    assert p["user_events"][0]["payload"] == masked and p["user_events"][0]["type"] == "user.creds"
    events = (await client.get(url("acme", x, "/events"), headers=bearer(READER))).json()["events"]
    assert [e["event"]["type"] for e in events] == ["execution.requested", "step.enter", "call.error", "step.exit", "user.creds"]
    assert events[0]["event"]["payload"] == {"playbook": None, "workload": {"db": masked, "n": 1}}
    assert events[2]["event"]["payload"] == {"error": masked}
    assert events[4]["event"]["payload"] == masked

    q = (await client.get(url("acme", via_nats), headers=bearer(READER))).json()
    assert q["workload"] == masked and q["steps"]["s"]["result"] == {"inner": masked}
    assert q["status"] == "FAILED" and q["error"] == "connect postgres://bob:***@db/x failed; password=***"
    assert q["playbook"] == {"path": "p", "version": 1}
