"""The edge's HTTP API through httpx's ASGI transport against a real nats-server: every route,
status code and problem document (the SSE route is tested through a real Hypercorn elsewhere)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from edge.cli import main as cli_main
from kernel.host import consumer_stream, context_for, load_plugin, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from natscluster.server import EmbeddedServer, free_port
from locator import new_event, shard_for
from locator.envelope import decode_envelope
from locator.subjects import cmd_subject, wal_stream
from locator.topology import Topology, default_topology
from projector.cache import KvProjectionCache
from projector.snapshots import SnapshotStore

ADMIN = "tok-admin-routes-5b1f0c"
H = {"Authorization": f"Bearer {ADMIN}"}
TOKENS = [TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)]
BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"
VECTORS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "locator.json").read_text())
LOCATE_KEYS = ["tenant", "project", "affinity", "shard_count", "fnv1a32", "shard", "cell", "subject_prefix", "stream"]
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


def base(tenant: str = "acme", project: str = "web") -> str:
    return BASE.format(tenant=tenant, project=project)


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == "application/problem+json", resp.headers
    body: dict[str, Any] = resp.json()
    assert PROBLEM_KEYS <= set(body), body
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"] == "about:blank"
    assert body["instance"] == resp.request.url.path
    return body


def make_app(topology: Topology, tmp_path: Path, **kw: Any) -> Starlette:
    return create_app(
        topology=topology,
        tokens=kw.pop("tokens", TOKENS),
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
        min_seq_wait=kw.pop("min_seq_wait", 1.0),
        **kw,
    )


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = make_app(default_topology(nats_url=nats_server.url), tmp_path)
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


@pytest.fixture
async def down_app(tmp_path: Path) -> AsyncIterator[Starlette]:
    """An edge whose only cell points at a port where nothing listens."""
    a = make_app(default_topology(nats_url=f"nats://127.0.0.1:{free_port()}"), tmp_path)
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


async def start(client: httpx.AsyncClient, tenant: str = "acme", project: str = "web", **body: Any) -> dict[str, Any]:
    resp = await client.post(base(tenant, project), json=body, headers=H)
    assert resp.status_code == 202, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def wal_last_seq(js: JetStreamContext, shard_count: int = 4) -> list[int]:
    return [(await js.stream_info(wal_stream(n))).state.last_seq for n in range(shard_count)]


async def wal_messages(js: JetStreamContext, shard_count: int = 4) -> list[int]:
    return [(await js.stream_info(wal_stream(n))).state.messages for n in range(shard_count)]


async def register(client: httpx.AsyncClient, path: str = "demo/x", version: int = 1, tenant: str = "acme") -> None:
    """Register a one-step noop playbook, so that a start may name it."""
    source = f"path: {path}\nversion: {version}\nsteps:\n  - {{name: a, tool: {{kind: noop, result: {version}}}}}\n"
    url = f"/api/v1/tenants/{tenant}/projects/web/playbooks/{path}"
    resp = await client.put(url, content=source, headers={**H, "Content-Type": "application/yaml"})
    assert resp.status_code in (200, 201), resp.text


# --- POST start -------------------------------------------------------------------------------


async def test_start_answers_202_and_writes_execution_requested(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    await register(client, "demo/etl", 3)
    body = {"playbook": {"path": "demo/etl", "version": 3}, "workload": {"n": 3, "mode": "full"}}
    resp = await client.post(base(), json=body, headers=H)
    assert resp.status_code == 202, resp.text
    assert resp.headers["content-type"] == "application/json"
    out = resp.json()
    assert set(out) == {"execution_id", "urn", "seq", "stream", "event_id", "playbook"}
    assert out["playbook"] == {"path": "demo/etl", "version": 3}
    x = out["execution_id"]
    assert isinstance(x, str) and x.isdigit() and int(x) > 0
    assert out["urn"] == f"noetl://acme/web/executions/{x}"
    shard = shard_for("acme", "web", "", 4)
    assert out["stream"] == f"WAL_{shard}" and isinstance(out["seq"], int) and out["seq"] >= 1
    assert resp.headers["location"] == f"/api/v1/tenants/acme/projects/web/executions/{x}"

    msg = await js.get_msg(out["stream"], out["seq"])
    assert msg.subject == f"wal.{shard}.acme.web.{x}.execution.requested"
    assert (msg.headers or {})["Nats-Msg-Id"] == out["event_id"]
    env = decode_envelope(msg.data or b"")
    assert (env.type, env.tenant, env.project, env.execution_id, env.event_id) == (
        "execution.requested", "acme", "web", x, out["event_id"]
    )
    assert env.payload == {"playbook": {"path": "demo/etl", "version": 3}, "workload": {"n": 3, "mode": "full"}}

    # Two starts are two executions.
    again = await start(client)
    assert again["execution_id"] != x and again["seq"] == out["seq"] + 1
    assert "playbook" not in again  # none named


async def test_start_pins_the_version_it_resolved(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    await register(client, "demo/etl", 1)
    await register(client, "demo/etl", 2)
    latest = await start(client, playbook={"path": "demo/etl"})
    assert latest["playbook"] == {"path": "demo/etl", "version": 2}
    older = await start(client, playbook={"path": "demo/etl", "version": 1})
    assert older["playbook"] == {"path": "demo/etl", "version": 1}
    await register(client, "demo/etl", 3)  # registered after the start: what was recorded stays
    for started, version in ((latest, 2), (older, 1)):
        env = decode_envelope((await js.get_msg(started["stream"], started["seq"])).data or b"")
        assert env.payload["playbook"] == {"path": "demo/etl", "version": version}
        got = await client.get(f"{base()}/{started['execution_id']}?min_seq={started['seq']}", headers=H)
        assert got.json()["playbook"] == {"path": "demo/etl", "version": version}


async def test_start_of_an_unknown_playbook_is_a_404_and_publishes_nothing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    await register(client, "demo/etl", 1)
    before = (await wal_messages(js), await wal_last_seq(js))

    body = assert_problem(await client.post(base(), json={"playbook": {"path": "demo/nope"}}, headers=H), 404)
    assert body["field"] == "playbook.path"
    assert body["detail"].startswith("no playbook demo/nope in acme/web: register it first")
    body = assert_problem(
        await client.post(base() + "?affinity=eu-2", json={"playbook": {"path": "demo/nope", "version": 1}}, headers=H), 404
    )
    assert body["field"] == "playbook.path"
    body = assert_problem(await client.post(base(), json={"playbook": {"path": "demo/etl", "version": 5}}, headers=H), 404)
    assert body["field"] == "playbook.version"
    assert body["detail"] == "no version 5 of playbook demo/etl in acme/web (the latest is version 1)"
    # The catalog is per tenant and project: acme/web's playbook is unknown to globex/web.
    body = assert_problem(await client.post(base("globex"), json={"playbook": {"path": "demo/etl"}}, headers=H), 404)
    assert body["detail"].startswith("no playbook demo/etl in globex/web")

    for ref in ({"path": "../etl"}, {"path": "demo/etl", "version": 0}, {"path": "demo/etl", "version": "1"},
                {"version": 1}, {"path": "demo/etl", "extra": 1}, "demo/etl"):
        body = assert_problem(await client.post(base(), json={"playbook": ref}, headers=H), 422)
        assert "$.playbook" in body["detail"], body
    assert (await wal_messages(js), await wal_last_seq(js)) == before


async def test_start_with_affinity_and_defaults(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    resp = await client.post(base() + "?affinity=eu-2", headers=H)  # empty body: defaults
    assert resp.status_code == 202, resp.text
    out = resp.json()
    x = out["execution_id"]
    shard = shard_for("acme", "web", "eu-2", 4)
    assert out["stream"] == f"WAL_{shard}"
    assert out["urn"] == f"noetl://acme/web/executions/{x}?affinity=eu-2"
    assert resp.headers["location"] == f"/api/v1/tenants/acme/projects/web/executions/{x}?affinity=eu-2"
    env = decode_envelope((await js.get_msg(out["stream"], out["seq"])).data or b"")
    assert env.affinity == "eu-2" and env.payload == {"playbook": None, "workload": {}}
    # The affinity is part of where the projection lives: read it back with it.
    got = await client.get(resp.headers["location"], headers=H)
    assert got.status_code == 200 and got.json()["affinity"] == "eu-2"
    # Events of it are posted with the same affinity; without it they would go to another shard.
    posted = await client.post(f"{base()}/{x}/events?affinity=eu-2", json={"type": "execution.started"}, headers=H)
    assert posted.status_code == 200 and posted.json()["acks"][0]["stream"] == f"WAL_{shard}"
    assert shard != shard_for("acme", "web", "", 4)
    assert_problem(await client.post(f"{base()}/{x}/events", json={"type": "user.a"}, headers=H), 404)
    assert (await client.get(f"{base()}/{x}/events?affinity=eu-2", headers=H)).json()["events"][1]["event"]["affinity"] == "eu-2"

    # Affinity in the body works too.
    body = await start(client, affinity="eu-2", workload={"a": 1})
    assert body["stream"] == f"WAL_{shard}" and body["urn"].endswith("?affinity=eu-2")


async def test_start_rejects_bad_bodies(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    before = await wal_last_seq(js)
    assert_problem(await client.post(base(), json={"playbook": {"path": "x"}, "bogus": 1}, headers=H), 422)
    assert_problem(await client.post(base(), json={"workload": [1, 2]}, headers=H), 422)
    assert_problem(await client.post(base(), json=["not", "an", "object"], headers=H), 422)
    assert_problem(await client.post(base(), json={"affinity": "Bad Affinity"}, headers=H), 422)
    body = assert_problem(
        await client.post(base(), content=b"{not json", headers={**H, "content-type": "application/json"}), 400
    )
    assert "not valid JSON" in body["detail"]
    assert_problem(await client.post(base(), content=b"x" * (1024 * 1024 + 1), headers=H), 413)
    assert await wal_last_seq(js) == before


# --- POST events ------------------------------------------------------------------------------


async def test_publish_events_in_every_body_shape(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    x = (await start(client))["execution_id"]
    url = f"{base()}/{x}/events"
    as_list = [
        {"type": "step.enter", "step": "fetch", "attempt": 1},
        {"type": "step.exit", "step": "fetch", "attempt": 1, "payload": {"result": {"rows": 3}}},
    ]
    resp = await client.post(url, json=as_list, headers=H)
    assert resp.status_code == 200, resp.text
    acks = resp.json()["acks"]
    assert len(acks) == 2 and acks[1]["seq"] == acks[0]["seq"] + 1
    shard = shard_for("acme", "web", "", 4)
    for ack, doc in zip(acks, as_list, strict=True):
        assert ack["stream"] == f"WAL_{shard}" and ack["duplicate"] is False and ack["execution_id"] == x
        assert ack["subject"] == f"wal.{shard}.acme.web.{x}.{doc['type']}"
        env = decode_envelope((await js.get_msg(ack["stream"], ack["seq"])).data or b"")
        assert env.event_id == ack["event_id"] and env.type == doc["type"] and env.step == "fetch"

    single = await client.post(url, json={"type": "user.note", "event_id": "note-1", "payload": {"k": "v"}}, headers=H)
    assert single.status_code == 200 and len(single.json()["acks"]) == 1
    assert single.json()["acks"][0]["event_id"] == "note-1"

    wrapped = await client.post(url, json={"events": [{"type": "user.a"}, {"type": "user.b"}, {"type": "user.c"}]}, headers=H)
    assert wrapped.status_code == 200 and [a["seq"] for a in wrapped.json()["acks"]] == list(
        range(acks[1]["seq"] + 2, acks[1]["seq"] + 5)
    )

    # The same event_id again is acknowledged as a duplicate, never stored twice.
    before = await wal_last_seq(js)
    dup = await client.post(url, json={"type": "user.note", "event_id": "note-1", "payload": {"k": "v"}}, headers=H)
    assert dup.status_code == 200 and dup.json()["acks"][0]["duplicate"] is True
    assert await wal_last_seq(js) == before

    # Fields that agree with the URL are fine.
    agree = {"type": "user.ok", "tenant": "acme", "project": "web", "execution_id": x, "affinity": ""}
    assert (await client.post(url, json=agree, headers=H)).status_code == 200

    projection = (await client.get(f"{base()}/{x}", headers=H)).json()
    assert projection["steps"]["fetch"]["status"] == "COMPLETED" and projection["steps"]["fetch"]["result"] == {"rows": 3}
    assert projection["event_count"] == 1 + 2 + 1 + 3 + 1 and projection["user_event_count"] == 5


async def test_invalid_events_publish_nothing(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    x = (await start(client))["execution_id"]
    url = f"{base()}/{x}/events"
    before = await wal_last_seq(js)
    docs = [
        {"type": "user.fine"},
        {"type": "no.such.type"},
        {"type": "step.enter", "step": "bad step!"},
        {"type": "user.fine", "attempt": 0},
        {"type": "user.fine", "ts": "yesterday"},
        {"type": "user.fine", "payload": "not an object"},
    ]
    body = assert_problem(await client.post(url, json=docs, headers=H), 422)
    assert "nothing was published" in body["detail"]
    errors = body["errors"]
    assert [e["index"] for e in errors] == [1, 2, 3, 4, 5]
    assert [e["field"] for e in errors[:4]] == ["type", "step", "attempt", "ts"]
    assert errors[4]["field"] == "payload"
    assert all(isinstance(e["detail"], str) and e["detail"] for e in errors)
    assert await wal_last_seq(js) == before

    # Wrong shapes of the body as a whole.
    bad: Any
    for bad in ([], {}, {"events": []}, [1, 2], "text", {"events": "x"}):
        assert_problem(await client.post(url, json=bad, headers=H), 422)
    assert_problem(await client.post(url, headers=H), 422)  # empty body
    assert_problem(await client.post(url, content=b"[{", headers=H), 400)
    assert await wal_last_seq(js) == before


async def test_events_that_disagree_with_the_url_are_refused(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    x = (await start(client))["execution_id"]
    url = f"{base()}/{x}/events"
    before = await wal_last_seq(js)
    docs = [
        {"type": "user.a", "tenant": "globex"},
        {"type": "user.a", "project": "api"},
        {"type": "user.a", "execution_id": str(int(x) + 1)},
        {"type": "user.a", "affinity": "eu"},
    ]
    body = assert_problem(await client.post(url, json=docs, headers=H), 422)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(0, "tenant"), (1, "project"), (2, "execution_id"), (3, "affinity")]
    assert "globex" in body["errors"][0]["detail"] and "acme" in body["errors"][0]["detail"]
    # A single disagreeing event in a batch of good ones blocks the whole batch.
    body = assert_problem(await client.post(url, json=[{"type": "user.ok"}, docs[0]], headers=H), 422)
    assert [e["index"] for e in body["errors"]] == [1]
    assert await wal_last_seq(js) == before


async def test_events_for_an_unknown_execution_are_404(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    await start(client)  # the shard has history, just not this execution's
    before = await wal_last_seq(js)
    body = assert_problem(await client.post(f"{base()}/987654321/events", json=[{"type": "user.a"}], headers=H), 404)
    assert "987654321" in body["detail"]
    # Same id under another project is still unknown.
    x = (await start(client))["execution_id"]
    assert_problem(await client.post(f"{base('acme', 'other')}/{x}/events", json={"type": "user.a"}, headers=H), 404)
    assert await wal_last_seq(js) == [b + (1 if n == shard_for("acme", "web", "", 4) else 0) for n, b in enumerate(before)]


async def test_oversize_body_and_payload_are_413(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    x = (await start(client))["execution_id"]
    url = f"{base()}/{x}/events"
    before = await wal_last_seq(js)
    # Declared too large (Content-Length).
    big = json.dumps([{"type": "user.a", "payload": {"blob": "x" * 600_000}}] * 2).encode()
    assert len(big) > 1024 * 1024
    body = assert_problem(await client.post(url, content=big, headers={**H, "content-type": "application/json"}), 413)
    assert "limit" in body["detail"]

    # Streamed without a Content-Length: caught while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    assert_problem(await client.post(url, content=chunks(), headers=H), 413)

    # Within the body limit, but one event's payload is over the 64 KiB cap.
    docs = [{"type": "user.small"}, {"type": "user.big", "payload": {"blob": "y" * (65 * 1024)}}]
    body = assert_problem(await client.post(url, json=docs, headers=H), 413)
    assert "event 1" in body["detail"] and "65536" in body["detail"] and "result_ref" in body["detail"]
    # Just under the cap is accepted.
    ok = await client.post(url, json={"type": "user.fits", "payload": {"blob": "z" * (60 * 1024)}}, headers=H)
    assert ok.status_code == 200, ok.text
    after = await wal_last_seq(js)
    assert sum(after) == sum(before) + 1


# --- GET projection ---------------------------------------------------------------------------


async def test_get_projection_etag_and_conditional(client: httpx.AsyncClient) -> None:
    await register(client, "demo/x", 1)
    started = await start(client, playbook={"path": "demo/x", "version": 1}, workload={"n": 3})
    x = started["execution_id"]
    url = f"{base()}/{x}"
    resp = await client.get(url, headers=H)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    p = resp.json()
    assert {k: p[k] for k in ("execution_id", "tenant", "project", "affinity", "status", "playbook", "workload")} == {
        "execution_id": x, "tenant": "acme", "project": "web", "affinity": "",
        "status": "PENDING", "playbook": {"path": "demo/x", "version": 1}, "workload": {"n": 3},
    }
    assert p["last_seq"] == started["seq"] and p["event_count"] == 1 and p["steps"] == {}
    assert p["created_at"] and p["updated_at"]
    assert resp.headers["etag"] == f'"{started["seq"]}"'
    assert resp.headers["x-noetl-source"] in ("cache", "snapshot", "replay")

    not_modified = await client.get(url, headers={**H, "If-None-Match": resp.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == resp.headers["etag"]
    assert (await client.get(url, headers={**H, "If-None-Match": "*"})).status_code == 304
    assert (await client.get(url, headers={**H, "If-None-Match": '"1234567"'})).status_code == 200
    # A list of validators, and weak comparison (RFC 9110 13.1.2), as caches and proxies send them.
    etag = resp.headers["etag"]
    for header in (f'"999", {etag}', f"W/{etag}", f'W/"999" , W/{etag}'):
        assert (await client.get(url, headers={**H, "If-None-Match": header})).status_code == 304, header
    assert (await client.get(url, headers={**H, "If-None-Match": '"999", W/"998"'})).status_code == 200

    # A new event moves the ETag; the old one no longer matches.
    ack = (await client.post(f"{url}/events", json={"type": "execution.started"}, headers=H)).json()["acks"][0]
    moved = await client.get(url, params={"min_seq": ack["seq"]}, headers={**H, "If-None-Match": resp.headers["etag"]})
    assert moved.status_code == 200 and moved.headers["etag"] == f'"{ack["seq"]}"'
    assert moved.json()["status"] == "RUNNING"


async def test_get_projection_unknown_and_invalid(client: httpx.AsyncClient) -> None:
    x = (await start(client))["execution_id"]
    body = assert_problem(await client.get(f"{base()}/123456789", headers=H), 404)
    assert "123456789" in body["detail"]
    # The id exists, but under another tenant/project: still 404, and nothing of it leaks.
    assert_problem(await client.get(f"{base('acme', 'api')}/{x}", headers=H), 404)
    assert_problem(await client.get(f"{base('globex', 'web')}/{x}", headers=H), 404)

    for url, field in (
        (f"{base('Bad', 'web')}/{x}", "tenant"),
        (f"{base('acme', 'a.b')}/{x}", "project"),
        (f"{base('acme', '*')}/{x}", "project"),
        (f"{base('a' * 64, 'web')}/{x}", "tenant"),
        (f"{base()}/{x}?affinity=EU", "affinity"),
        (f"{base()}/abc", "execution_id"),
        (f"{base()}/0123", "execution_id"),
        (f"{base()}/{2**63}", "execution_id"),
    ):
        body = assert_problem(await client.get(url, headers=H), 422)
        assert body["field"] == field and field in body["detail"], (url, body)

    for bad in ("abc", "0", "-1", "1.5", str(2**63), "\u00b2", "\u0663", " 5", "+5"):
        body = assert_problem(await client.get(f"{base()}/{x}", params={"min_seq": bad}, headers=H), 422)
        assert body["field"] == "min_seq" and "min_seq" in body["detail"]
    body = assert_problem(await client.get(f"{base()}/{x}", params={"as_of_seq": "x"}, headers=H), 422)
    assert body["field"] == "as_of_seq"


# --- GET events -------------------------------------------------------------------------------


async def test_list_events_pages(client: httpx.AsyncClient) -> None:
    started = await start(client)
    x = started["execution_id"]
    other = (await start(client))["execution_id"]  # interleaved: paging must skip it
    url = f"{base()}/{x}/events"
    seqs = [started["seq"]]
    for i in range(6):
        for target in (x, other):
            acks = (await client.post(f"{base()}/{target}/events", json={"type": f"user.e{i}"}, headers=H)).json()["acks"]
            if target == x:
                seqs.append(acks[0]["seq"])
    assert len(seqs) == 7

    everything = (await client.get(url, headers=H)).json()
    assert [e["seq"] for e in everything["events"]] == seqs and everything["next_after_seq"] is None
    first = everything["events"][0]
    assert first["event"]["type"] == "execution.requested" and first["event"]["execution_id"] == x
    assert first["event"]["event_id"] == started["event_id"]

    pages: list[list[int]] = []
    after: int | None = 0
    while after is not None:
        resp = await client.get(url, params={"after_seq": after, "limit": 3}, headers=H)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append([e["seq"] for e in page["events"]])
        after = page["next_after_seq"]
        if after is not None:
            assert after == pages[-1][-1]
        assert len(pages) < 10
    assert pages == [seqs[0:3], seqs[3:6], seqs[6:7]]

    # Exactly a page's worth left: the next page is empty and ends the paging.
    p = (await client.get(url, params={"after_seq": seqs[3], "limit": 3}, headers=H)).json()
    assert [e["seq"] for e in p["events"]] == seqs[4:7] and p["next_after_seq"] == seqs[6]
    p = (await client.get(url, params={"after_seq": seqs[6], "limit": 3}, headers=H)).json()
    assert p == {"events": [], "next_after_seq": None}

    assert_problem(await client.get(f"{base()}/55555/events", headers=H), 404)
    for params, field in (
        ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"after_seq": "-1"}, "after_seq"),
        ({"after_seq": "\u00b2"}, "after_seq"), ({"limit": "\u00b3"}, "limit"),
    ):
        body = assert_problem(await client.get(url, params=params, headers=H), 422)
        assert body["field"] == field


# --- locate, health, readiness, metrics, unknown routes ----------------------------------------


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"{v['tenant']}-{v['shard_count']}")
async def test_locate_agrees_with_the_cli(v: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No NATS is needed to locate.
    topology = default_topology(shard_count=v["shard_count"], nats_url=f"nats://127.0.0.1:{free_port()}")
    app = make_app(topology, tmp_path)
    params = {"tenant": v["tenant"], "project": v["project"], "affinity": v["affinity"]}
    async with client_for(app) as c:
        resp = await c.get("/api/v1/locate", params=params, headers=H)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert list(out) == LOCATE_KEYS
    assert (out["fnv1a32"], out["shard"], out["shard_count"]) == (v["fnv1a32"], v["shard"], v["shard_count"])
    assert out == msgspec.to_builtins(topology.locate(v["tenant"], v["project"], v["affinity"]))

    capsys.readouterr()
    args = ["locate", "--tenant", v["tenant"], "--project", v["project"], "--affinity", v["affinity"]]
    assert cli_main([*args, "--shards", str(v["shard_count"])]) == 0
    assert json.loads(capsys.readouterr().out) == out


async def test_locate_needs_a_token_and_valid_names(client: httpx.AsyncClient) -> None:
    params = {"tenant": "acme", "project": "web"}
    assert_problem(await client.get("/api/v1/locate", params=params), 401)
    out = (await client.get("/api/v1/locate", params=params, headers=H)).json()
    assert out["affinity"] == "" and out["stream"] == f"WAL_{shard_for('acme', 'web', '', 4)}"
    for params, field in (
        ({"tenant": "Acme", "project": "web"}, "tenant"),
        ({"tenant": "acme", "project": "w.b"}, "project"),
        ({"tenant": "acme"}, "project"),
        ({"tenant": "acme", "project": "web", "affinity": "X"}, "affinity"),
    ):
        body = assert_problem(await client.get("/api/v1/locate", params=params, headers=H), 422)
        assert field in body["detail"]


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and ready.json()["cells"] == {"local": True}


async def test_readiness_and_reads_without_nats(down_app: Starlette) -> None:
    async with client_for(down_app) as c:
        assert (await c.get("/healthz")).status_code == 200  # liveness does not depend on NATS
        ready = await c.get("/readyz")
        body = assert_problem(ready, 503)
        assert ready.headers["retry-after"].isdigit()
        assert body["cells"] == {"local": False} and body["problems"] and "local" in body["problems"][0]

        for _ in range(2):  # first the failed connect, then the remembered failure
            resp = await c.get(f"{base()}/12345", headers=H)
            body = assert_problem(resp, 503)
            assert resp.headers["retry-after"].isdigit() and "local" in body["detail"]
            await asyncio.sleep(0)
        assert_problem(await c.get(f"{base()}/12345/events", headers=H), 503)
        resp = await c.post(base(), json={}, headers=H)
        assert_problem(resp, 503)
        assert resp.headers["retry-after"].isdigit()
        resp = await c.post(f"{base()}/12345/events", json={"type": "user.a"}, headers=H)
        assert_problem(resp, 503)
        # Auth is still checked first; locate needs no NATS at all.
        assert_problem(await c.get(f"{base()}/12345"), 401)
        assert (await c.get("/api/v1/locate", params={"tenant": "acme", "project": "web"}, headers=H)).status_code == 200
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        for shard in range(4):
            assert f'noetl_shard_reachable{{shard="{shard}"}} 0.0' in metrics.text


async def test_nats_going_away_answers_503(tmp_path: Path, topology: Topology) -> None:
    """The cell's server stops after the edge connected: reads answer 503 (not 500, not a hang)."""
    from kernel.bootstrap import bootstrap
    from kernel.connect import close, connect

    server = EmbeddedServer(data_dir=tmp_path / "own", topology=topology, port=0)
    server.start()
    try:
        nc = await connect([server.url], name="pytest-own")
        await bootstrap(nc.jetstream(), topology)
        await close(nc)
        app = make_app(default_topology(nats_url=server.url), tmp_path)
        async with client_for(app) as c:
            x = (await start(c))["execution_id"]
            assert (await c.get(f"{base()}/{x}", headers=H)).status_code == 200
            server.stop()
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                resp = await c.get(f"{base()}/{x}", headers=H)
                if resp.status_code != 200:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the edge kept answering 200 with NATS gone"
                await asyncio.sleep(0.1)
            assert_problem(resp, 503)
            assert resp.headers["retry-after"].isdigit()
            assert_problem(await c.get("/readyz"), 503)
        await app.state.edge.cells.close()
    finally:
        server.stop()


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/api/v1/nope", headers=H), 404)
    assert body["title"] == "Not Found"
    assert_problem(await client.get("/", headers=H), 404)
    resp = await client.delete(f"{base()}/123", headers=H)
    body = assert_problem(resp, 405)
    assert "GET" in resp.headers["allow"]


def _pumps(js: JetStreamContext, shard: int, cache: KvProjectionCache, store: SnapshotStore) -> list[Pump]:
    out = []
    for manifest in system_manifests():
        ctx = context_for(manifest, shard, cache=cache, snapshots=store)
        out.append(
            Pump(js, shard=shard, shard_count=4, plugin=load_plugin(manifest), ctx=ctx, consumer=manifest.consumer, source=manifest.source,
                 max_batch=manifest.max_batch, linger=0.05, fetch_wait=0.2, types=manifest.types)
        )
    return out


async def test_metrics(
    client: httpx.AsyncClient, js: JetStreamContext, nats_server: EmbeddedServer, topology: Topology, tmp_path: Path,
    pump_until: Any,
) -> None:
    tenants: dict[int, str] = {}
    n = 0
    while len(tenants) < 4:
        tenants.setdefault(shard_for(f"t{n}", "web", "", 4), f"t{n}")
        n += 1
    started = {shard: await start(client, tenants[shard]) for shard in range(4)}
    # A poison message on shard 2 ends in its DLQ; one command waits in CMD_1.
    await js.publish(f"wal.2.{tenants[2]}.web.777.user.x", b"{not json", headers={"Nats-Msg-Id": "poison-1"})
    await js.publish(cmd_subject(1, "default"), b"{}", headers={"Nats-Msg-Id": "cmd-1"})

    store = SnapshotStore(f"file://{tmp_path}/objects")
    pumps: list[Pump] = []
    for shard in range(4):
        pumps += _pumps(js, shard, await KvProjectionCache.open(js, shard), store)

    async def caught_up() -> bool:
        for shard in range(4):
            for consumer in ("project", "materialize"):
                try:
                    info = await js.consumer_info(consumer_stream(consumer, shard), f"{consumer}_{shard}")
                except Exception:
                    return False
                if info.num_pending or info.num_ack_pending:
                    return False
        return (await js.stream_info("DLQ_2")).state.messages >= 1

    await pump_until(pumps, caught_up)
    # With the kernel stopped, a new event on shard 3 is lag.
    x3 = started[3]["execution_id"]
    r = await client.post(f"{base(tenants[3])}/{x3}/events", json={"type": "user.late"}, headers=H)
    assert r.status_code == 200
    await client.get("/healthz")
    await client.get(f"{base()}/424242", headers=H)  # a 404, counted by route template

    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['noetl_edge_requests_total{method="GET",route="/healthz",status="200"}'] >= 1
    assert samples[f'noetl_edge_requests_total{{method="GET",route="{BASE}/{{execution_id}}",status="404"}}'] == 1
    assert samples[f'noetl_edge_requests_total{{method="POST",route="{BASE}",status="202"}}'] == 4
    for shard in range(4):
        # system/materialize lags behind the projection bucket's writes, not the WAL: the unfolded event is none.
        for consumer, lagging in (("project", 3), ("materialize", None)):
            lag = samples[f'noetl_consumer_lag{{consumer="{consumer}",shard="{shard}"}}']
            assert lag == (1.0 if shard == lagging else 0.0), (shard, consumer, lag)
        # orchestrate (which cannot run a playbook here) and cleanup: what their consumers hold, as NATS says.
        for consumer in ("orchestrate", "cleanup"):
            info = await js.consumer_info(f"WAL_{shard}", f"{consumer}_{shard}")
            lag = samples[f'noetl_consumer_lag{{consumer="{consumer}",shard="{shard}"}}']
            assert lag == info.num_pending + info.num_ack_pending, (shard, consumer, lag)
        assert samples[f'noetl_dlq_messages{{shard="{shard}"}}'] == (1.0 if shard == 2 else 0.0)
        assert samples[f'noetl_pending_commands{{shard="{shard}"}}'] == (1.0 if shard == 1 else 0.0)
        assert samples[f'noetl_shard_reachable{{shard="{shard}"}}'] == 1.0
        assert samples[f'noetl_wal_last_seq{{shard="{shard}"}}'] >= 1
    assert any(k.startswith("noetl_edge_request_seconds_bucket") for k in samples)
    # Raw paths (execution ids) never become labels.
    assert "424242" not in text


async def test_a_down_cell_fails_only_its_own_shards(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    """Two cells: 'a' is the real server, 'b' accepts TCP but never speaks NATS (a hung cell).

    Requests for 'a' shards must not queue behind connection attempts to 'b'."""
    from locator.topology import Cell, make_topology

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open, never send INFO
        writer.close()

    hung = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    topology = make_topology(
        shard_count=4,
        replicas=1,
        cells=[Cell(name="a", urls=(nats_server.url,), shards=(0, 1)), Cell(name="b", urls=(f"nats://127.0.0.1:{port}",), shards=(2, 3))],
    )
    on = {shard: next(f"t{n}" for n in range(1000) if shard_for(f"t{n}", "web", "", 4) == shard) for shard in range(4)}
    app = make_app(topology, tmp_path)
    try:
        async with client_for(app) as c:
            xa = (await start(c, on[0]))["execution_id"]
            assert (await c.get(f"{base(on[1])}/{xa}", headers=H)).status_code == 404  # cell a answers
            slow = asyncio.create_task(c.get(f"{base(on[2])}/1234", headers=H))
            await asyncio.sleep(0.05)  # let it start connecting to cell b
            for shard in (0, 1):
                fast = await c.get(f"{base(on[shard])}/{xa}", headers=H)
                assert fast.status_code == (200 if shard == 0 else 404)
            assert not slow.done(), "a read on cell a waited for cell b's connection attempt"
            resp = await asyncio.wait_for(slow, 30)
            assert_problem(resp, 503)
            assert resp.headers["retry-after"].isdigit() and "'b'" in resp.json()["detail"]
            # Within the retry interval the failure is remembered: 503 at once, for both of b's shards.
            for shard in (2, 3):
                assert_problem(await c.post(base(on[shard]), json={}, headers=H), 503)
            ready = await c.get("/readyz")
            body = assert_problem(ready, 503)
            assert body["cells"] == {"a": True, "b": False} and len(body["problems"]) == 1
            assert body["problems"][0].startswith("cell b")
            metrics = (await c.get("/metrics")).text
            for shard, up in ((0, 1.0), (1, 1.0), (2, 0.0), (3, 0.0)):
                assert f'noetl_shard_reachable{{shard="{shard}"}} {up}' in metrics
    finally:
        await app.state.edge.cells.close()
        hung.close()


@pytest.mark.slow
async def test_a_frozen_server_answers_503_on_every_route(client: httpx.AsyncClient, nats_server: EmbeddedServer) -> None:
    """SIGSTOP the nats-server: the TCP connection stays up but nothing answers, so every NATS call
    times out. Each route must say 503 + Retry-After (not 404, not 500)."""
    import os
    import signal

    x = (await start(client))["execution_id"]
    assert (await client.get(f"{base()}/{x}/events", headers=H)).status_code == 200
    assert nats_server.process is not None
    os.kill(nats_server.process.pid, signal.SIGSTOP)
    try:
        for resp in (
            await client.get(f"{base()}/{x}", headers=H),
            await client.get(f"{base()}/{x}/events", headers=H),
        ):
            assert_problem(resp, 503)
            assert resp.headers["retry-after"].isdigit()
        # The edge knows x (it started it), so the publish itself is what times out: the event may be stored
        # once the server wakes, and the answer says so (publish it again: the same event_id is dropped).
        sent = await client.post(f"{base()}/{x}/events", json={"type": "user.a"}, headers=H)
        assert_problem(sent, 502)
        assert "may or may not be stored" in sent.json()["acks"][0]["error"]
    finally:
        os.kill(nats_server.process.pid, signal.SIGCONT)
    # And it recovers by itself.
    assert (await client.get(f"{base()}/{x}", headers=H)).status_code == 200
