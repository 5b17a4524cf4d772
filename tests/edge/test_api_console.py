"""The console's static files at /ui/, and the two public routes it added: whoami and a shard's dead letters
(httpx ASGI against a real nats-server). The console itself is driven in a real Chromium in tests/browser."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext

from edge.auth import TokenSpec
from kernel.dlq import DLQ_CONSUMER, DLQ_REASON, DLQ_SEQ, DLQ_STREAM, DLQ_SUBJECT
from natscluster.server import EmbeddedServer
from locator.subjects import dlq_subject
from locator.topology import default_topology
from tests.edge.test_api_routes import assert_problem, client_for, make_app

ADMIN, READER = "tok-console-admin-1f0c", "tok-console-reader-77aa"
TOKENS = [
    TokenSpec(name="ops", role="admin", tenants=("*",), token=ADMIN),
    TokenSpec(name="viewer", role="read", tenants=("acme", "beta"), token=READER),
]
STATIC = Path(str(files("edge.console") / "static"))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def client(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(default_topology(nats_url=nats_server.url), tmp_path, tokens=TOKENS)
    try:
        async with client_for(app) as c:
            yield c
    finally:
        await app.state.edge.cells.close()


async def test_the_console_is_served_with_a_policy_that_allows_only_this_origin(client: httpx.AsyncClient) -> None:
    resp = await client.get("/ui/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js"></script>' in resp.text
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    js = await client.get("/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert (await client.get("/ui", follow_redirects=False)).status_code in (307, 308)
    assert (await client.get("/ui/no-such-file.js")).status_code == 404
    assert (await client.get("/ui/../__init__.py")).status_code == 404


def test_every_module_the_console_imports_ships_and_nothing_comes_from_elsewhere() -> None:
    """The assets are package data (importlib.resources finds them), with no build step and no CDN."""
    names = {p.name for p in STATIC.iterdir()}
    assert {"index.html", "app.js", "api.js", "style.css"} <= names
    for path in STATIC.glob("*.js"):
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r'^import .* from "([^"]+)";', text, re.M):
            assert target.startswith("./") and target[2:] in names, f"{path.name} imports {target}"
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", text), f"{path.name}: never parse markup"
    for path in STATIC.iterdir():
        assert not re.search(r"(src|href)=\"(https?:)?//", path.read_text(encoding="utf-8")), path.name


async def test_whoami_tells_the_tokens_scope_never_the_token(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/api/v1/whoami"), 401)
    assert_problem(await client.get("/api/v1/whoami", headers=auth("wrong")), 401)
    resp = await client.get("/api/v1/whoami", headers=auth(READER))
    assert resp.status_code == 200
    assert resp.json() == {"name": "viewer", "role": "read", "tenants": ["acme", "beta"], "shard_count": 4}
    assert READER not in resp.text
    assert (await client.get("/api/v1/whoami", headers=auth(ADMIN))).json()["tenants"] == ["*"]


async def test_dead_letters_of_a_shard_paged(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    for n in range(3):
        await js.publish(dlq_subject(2, "bad_envelope"), b'{"not": "an envelope"}' + bytes([n + 48]), headers={
            DLQ_REASON: f"bad_envelope: missing field `type` ({n})", DLQ_STREAM: "WAL_2", DLQ_SEQ: str(40 + n),
            DLQ_SUBJECT: f"wal.2.acme.web.{n + 1}.step.exit", DLQ_CONSUMER: "project_2",
        })
    resp = await client.get("/api/v1/dead-letters", params={"shard": 2, "limit": 2}, headers=auth(ADMIN))
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert page["shard"] == 2 and page["next_after_seq"] == 2
    first = page["dead_letters"][0]
    assert first["reason"] == "bad_envelope" and first["detail"] == "missing field `type` (0)"
    assert (first["subject"], first["stream"], first["original_seq"], first["consumer"]) == (
        "wal.2.acme.web.1.step.exit", "WAL_2", 40, "project_2")
    assert first["preview"] == '{"not": "an envelope"}0' and first["size"] == 23 and first["filed_at"]
    rest = (await client.get("/api/v1/dead-letters", params={"shard": 2, "after_seq": 2}, headers=auth(ADMIN))).json()
    assert [d["original_seq"] for d in rest["dead_letters"]] == [42] and rest["next_after_seq"] is None
    empty = (await client.get("/api/v1/dead-letters", params={"shard": 0}, headers=auth(ADMIN))).json()
    assert empty == {"shard": 0, "dead_letters": [], "next_after_seq": None}


@pytest.mark.parametrize("params", [{}, {"shard": "4"}, {"shard": "x"}, {"shard": "-1"}, {"shard": "0", "limit": "501"},
                                    {"shard": "0", "after_seq": "1e3"}])
async def test_dead_letters_refuse_bad_input(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    body = assert_problem(await client.get("/api/v1/dead-letters", params=params, headers=auth(ADMIN)), 422)
    assert body["field"] in {"shard", "limit", "after_seq"}


async def test_dead_letters_need_the_admin_role(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/api/v1/dead-letters", params={"shard": 0}), 401)
    assert_problem(await client.get("/api/v1/dead-letters", params={"shard": 0}, headers=auth(READER)), 403)


@pytest.mark.parametrize("rows", ["0", "1001", "x"])
async def test_a_results_rows_parameter_out_of_range_is_refused(client: httpx.AsyncClient, rows: str) -> None:
    url = "/api/v1/tenants/acme/projects/web/executions/42/steps/fetch/result"
    body = assert_problem(await client.get(url, params={"rows": rows}, headers=auth(ADMIN)), 422)
    assert body["field"] == "rows"
