"""Schedule routes through httpx's ASGI transport against a real nats-server: create, list, show, pause,
resume, delete, auth, and bad input refused with a problem document and nothing stored."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from starlette.applications import Starlette

from edge.auth import TokenSpec
from natscluster.server import EmbeddedServer
from locator.subjects import SCHEDULES_BUCKET
from locator.topology import default_topology
from projector.historystats import stream_subjects
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.playbook import Policy
from tests.edge.test_api_routes import ADMIN, assert_problem, client_for, make_app

BASE = "/api/v1/tenants/acme/projects/web/schedules"
READER = "tok-reader-schedules-91c2"
PLAYBOOK = "path: sched/noop\nversion: 1\nsteps: [{name: a, tool: {kind: noop}}]"


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    await (await Catalog.open(js)).register("acme", "web", PLAYBOOK, policy=Policy())
    tokens = [TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN),
              TokenSpec(name="reader", role="read", tenants=("acme",), token=READER)]  # fmt: skip
    a = make_app(default_topology(nats_url=nats_server.url), tmp_path, tokens=tokens)
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def edge(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app), client_for(app) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


async def stored_keys(js: JetStreamContext) -> list[str]:
    """The bucket's live keys (a deleted key's subject keeps its purge marker), read from its stream's subjects."""
    prefix = f"$KV.{SCHEDULES_BUCKET}."
    kv = await js.key_value(SCHEDULES_BUCKET)
    live = []
    for key in sorted([s[len(prefix):] async for s in stream_subjects(js, f"KV_{SCHEDULES_BUCKET}", prefix + ">")]):
        with contextlib.suppress(KeyNotFoundError):
            await kv.get(key)
            live.append(key)
    return live


def body(**fields: Any) -> dict[str, Any]:
    return {"id": "hourly", "playbook": {"path": "sched/noop"}, "cron": "0 * * * *", "timezone": "Europe/Berlin", **fields}


async def test_create_list_show_pause_resume_delete(edge: httpx.AsyncClient, js: JetStreamContext) -> None:
    resp = await edge.post(BASE, json=body(workload={"n": 1}))
    assert resp.status_code == 201, resp.text
    assert resp.headers["location"] == f"{BASE}/hourly"
    created = resp.json()
    assert created["schedule"]["cron"] == "0 * * * *" and created["schedule"]["workload"] == {"n": 1}
    assert created["next_tick"].endswith(":00:00.000Z") and created["last_tick"] is None
    assert (await edge.post(BASE, json=body(id="every2", cron=None, timezone="UTC", every="2s"))).status_code == 201

    listed = (await edge.get(BASE)).json()["schedules"]
    assert [v["schedule"]["id"] for v in listed] == ["every2", "hourly"]
    assert listed[0]["schedule"]["every_s"] == 2
    assert (await edge.get(f"{BASE}/hourly")).json()["schedule"] == created["schedule"]

    paused = (await edge.post(f"{BASE}/hourly/pause")).json()
    assert paused["schedule"]["paused"] is True and paused["next_tick"] is None
    resumed = (await edge.post(f"{BASE}/hourly/resume")).json()
    assert resumed["schedule"]["paused"] is False and resumed["next_tick"] is not None
    assert resumed["schedule"]["not_before_ms"] >= created["schedule"]["not_before_ms"]

    assert (await edge.delete(f"{BASE}/hourly")).status_code == 204
    assert_problem(await edge.get(f"{BASE}/hourly"), 404)
    assert_problem(await edge.delete(f"{BASE}/hourly"), 404)
    assert [v["schedule"]["id"] for v in (await edge.get(BASE)).json()["schedules"]] == ["every2"]
    assert await stored_keys(js) == ["def.acme.web.every2"]


@pytest.mark.parametrize(
    ("fields", "status", "field", "words"),
    [
        ({"cron": "61 * * * *"}, 422, "cron", "Bad minute"),
        ({"timezone": "Mars/Olympus"}, 422, "timezone", "unknown time zone"),
        ({"cron": None, "every": "fortnightly"}, 422, "every", "like '2s'"),
        ({"cron": None}, 422, "every", "exactly one of cron"),
        ({"overlap": "sometimes"}, 422, "overlap", "overlap"),
        ({"catchup": "all"}, 422, "catchup", "catchup"),
        ({"id": "Bad.Id"}, 422, "id", "id"),
        ({"unknown": 1}, 422, "$", "unknown field `unknown`"),
        ({"playbook": {"path": "sched/nope"}}, 404, "playbook.path", "no playbook sched/nope"),
        ({"playbook": {"path": "sched/noop", "version": 7}}, 404, "playbook.version", "the latest is version 1"),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_stored(
    edge: httpx.AsyncClient, js: JetStreamContext, fields: dict[str, Any], status: int, field: str, words: str
) -> None:
    problem = assert_problem(await edge.post(BASE, json=body(**fields)), status)
    assert problem.get("field") == field and words in problem["detail"], problem
    assert await stored_keys(js) == []


async def test_a_taken_id_is_a_conflict_and_the_first_stays(edge: httpx.AsyncClient) -> None:
    assert (await edge.post(BASE, json=body())).status_code == 201
    assert_problem(await edge.post(BASE, json=body(cron="*/5 * * * *")), 409)
    assert (await edge.get(f"{BASE}/hourly")).json()["schedule"]["cron"] == "0 * * * *"


async def test_roles_and_tenants(edge: httpx.AsyncClient) -> None:
    assert (await edge.post(BASE, json=body())).status_code == 201
    reader = {"Authorization": f"Bearer {READER}"}
    assert (await edge.get(BASE, headers=reader)).status_code == 200
    assert (await edge.get(f"{BASE}/hourly", headers=reader)).status_code == 200
    assert_problem(await edge.post(BASE, json=body(id="other"), headers=reader), 403)
    assert_problem(await edge.post(f"{BASE}/hourly/pause", headers=reader), 403)
    assert_problem(await edge.delete(f"{BASE}/hourly", headers=reader), 403)
    assert_problem(await edge.get("/api/v1/tenants/other/projects/web/schedules", headers=reader), 403)
    assert_problem(await edge.get(BASE, headers={"Authorization": "Bearer nope"}), 401)
    assert_problem(await edge.get(f"{BASE}/Bad.Id"), 422)
    assert_problem(await edge.post(f"{BASE}/missing/pause"), 404)
