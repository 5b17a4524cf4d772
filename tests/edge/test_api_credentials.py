"""Credential routes through httpx's ASGI transport against a real nats-server: admin only, tenant-scoped,
metadata only, bad input changes nothing."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from worker.keychain import MAX_VALUE, Keychain, PlatformKey, Scope
from natscluster.server import EmbeddedServer
from locator.topology import default_topology
from projector.snapshots import SnapshotStore

ROOT, ACME_ADMIN, GLOBEX_ADMIN, WRITER = "tok-kc-root", "tok-kc-acme", "tok-kc-globex", "tok-kc-writer"
TOKENS = [
    TokenSpec(name="root", role="admin", tenants=("*",), token=ROOT),
    TokenSpec(name="acme-admin", role="admin", tenants=("acme",), token=ACME_ADMIN),
    TokenSpec(name="globex-admin", role="admin", tenants=("globex",), token=GLOBEX_ADMIN),
    TokenSpec(name="writer", role="write", tenants=("*",), token=WRITER),
]
ACME = "/api/v1/tenants/acme/projects/web/credentials"
GLOBEX = "/api/v1/tenants/globex/projects/web/credentials"
SECRET = b"api-secret-7be0c1d24f9e"
NEEDLES = (SECRET, base64.b64encode(SECRET), base64.urlsafe_b64encode(SECRET), SECRET.hex().encode())


def auth(token: str = ROOT) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["detail"]
    return body


async def messages(js: JetStreamContext) -> int:
    return (await js.stream_info("KV_keychain")).state.messages


def build(nats_server: EmbeddedServer, tmp_path: Path, key: PlatformKey | None) -> Starlette:
    return create_app(
        topology=default_topology(nats_url=nats_server.url), tokens=TOKENS,
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"), keychain_key=key,
    )  # fmt: skip


@pytest.fixture
def kek() -> PlatformKey:
    return PlatformKey.generate()


@pytest.fixture
async def client(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, kek: PlatformKey) -> AsyncIterator[httpx.AsyncClient]:
    app = build(nats_server, tmp_path, kek)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
            yield c
    finally:
        await app.state.edge.cells.close()


async def test_put_get_list_delete_never_answer_the_value(client: httpx.AsyncClient, js: JetStreamContext, kek: PlatformKey) -> None:
    seen: list[httpx.Response] = []
    put = await client.put(f"{ACME}/api", content=SECRET, headers=auth())
    seen.append(put)
    assert put.status_code == 201 and put.headers["location"] == f"{ACME}/api"
    meta = put.json()
    assert (meta["alias"], meta["version"], meta["size"], meta["key_id"]) == ("api", 1, len(SECRET), kek.id)
    seen.append(again := await client.put(f"{ACME}/api", content=SECRET + b"-2", headers=auth(ACME_ADMIN)))
    assert again.json()["version"] == 2
    assert await Keychain(js, kek, env={}).resolve(Scope("acme", "web"), "api") == (SECRET + b"-2", 2)

    seen.append(got := await client.get(f"{ACME}/api", headers=auth()))
    assert got.status_code == 200 and got.json() == again.json()
    seen.append(listed := await client.get(ACME, headers=auth()))
    assert [(m["alias"], m["version"]) for m in listed.json()["items"]] == [("api", 2)]
    seen.append(gone := await client.delete(f"{ACME}/api", headers=auth()))
    assert gone.status_code == 204
    seen.append(await client.get(f"{ACME}/api", headers=auth()))
    problem(seen[-1], 404)
    seen.append(await client.delete(f"{ACME}/api", headers=auth()))
    problem(seen[-1], 404)
    for resp in seen:
        raw = resp.content + str(resp.headers).encode()
        assert not any(n in raw for n in NEEDLES), resp.text


async def test_tenant_isolation_and_the_admin_role(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    assert (await client.put(f"{GLOBEX}/db", content=b"globex-dsn", headers=auth(GLOBEX_ADMIN))).status_code == 201
    before = await messages(js)
    problem(await client.get(f"{GLOBEX}/db", headers=auth(ACME_ADMIN)), 403)
    problem(await client.get(GLOBEX, headers=auth(ACME_ADMIN)), 403)
    problem(await client.put(f"{GLOBEX}/db", content=b"x", headers=auth(ACME_ADMIN)), 403)
    problem(await client.delete(f"{GLOBEX}/db", headers=auth(ACME_ADMIN)), 403)
    # Its own scope does not show another tenant's alias either.
    assert (await client.get(ACME, headers=auth(ACME_ADMIN))).json() == {"items": []}
    problem(await client.get(f"{ACME}/db", headers=auth(ACME_ADMIN)), 404)
    # write is not enough, nor is no token.
    body = problem(await client.put(f"{ACME}/api", content=b"x", headers=auth(WRITER)), 403)
    assert "needs 'admin'" in body["detail"]
    problem(await client.get(ACME, headers=auth(WRITER)), 403)
    problem(await client.get(ACME), 401)
    assert await messages(js) == before


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        (f"{ACME}/api", b"", 422, "got none"),
        (f"{ACME}/api", b"x" * (MAX_VALUE + 1), 413, f"over the {MAX_VALUE}-byte limit"),
        (f"{ACME}/Bad_Alias", b"x", 422, "invalid alias 'Bad_Alias'"),
        (f"{ACME}/{'a' * 64}", b"x", 422, "invalid alias"),
        ("/api/v1/tenants/Acme/projects/web/credentials/api", b"x", 422, "invalid tenant"),
    ],
)
async def test_bad_input_changes_nothing(
    client: httpx.AsyncClient, js: JetStreamContext, path: str, body: bytes, status: int, detail: str
) -> None:
    before = await messages(js)
    got = problem(await client.put(path, content=body, headers=auth()), status)
    assert detail in got["detail"]
    assert await messages(js) == before


async def test_without_a_platform_key_a_put_is_a_503(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    app = build(nats_server, tmp_path, None)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
            body = problem(await c.put(f"{ACME}/api", content=SECRET, headers=auth()), 503)
            assert "no platform key" in body["detail"]
            assert (await c.get(ACME, headers=auth())).json() == {"items": []}  # metadata needs no key
    finally:
        await app.state.edge.cells.close()
    assert await messages(js) == 0
