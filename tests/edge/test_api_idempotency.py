"""Idempotent starts through the HTTP API and ``noetl-edge run``, against a real nats-server: one execution
per ``Idempotency-Key`` across two edges and restarts, 409 for another body, 400 for a bad key (nothing
written), and the CLI flag."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from starlette.applications import Starlette

from kernel.bootstrap import StreamSettings, bootstrap
from edge.idempotency import IdempotencyStore
from natscluster.server import EmbeddedServer
from locator.subjects import wal_stream
from locator.topology import default_topology
from tests.conftest import stream_messages
from tests.edge.test_api_routes import H, assert_problem, base, client_for, make_app, register
from tests.edge.test_serve import Proc, procs, start_edge, wait_listening  # noqa: F401 (procs: a fixture)
from tests.edge.test_serve import cli_env as serve_env
from tests.edge.test_serve import client_for as serve_client

KEY = "order-7f3a:2026-12-04/retry"  # ':' and '/' are not KV key characters: the store hashes the key


async def requested(js: JetStreamContext, shard_count: int = 4) -> list[tuple[int, dict[str, Any]]]:
    """Every execution.requested on the WAL of every shard, as (seq, envelope dict): the executions that exist."""
    found: list[tuple[int, dict[str, Any]]] = []
    for shard in range(shard_count):
        for seq, subject, _, data in await stream_messages(js, wal_stream(shard)):
            if subject.endswith(".execution.requested"):
                found.append((seq, json.loads(data)))
    return found


@pytest.fixture
async def client(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(default_topology(nats_url=nats_server.url), tmp_path)
    try:
        async with client_for(app) as c:
            yield c
    finally:
        await app.state.edge.cells.close()


@pytest.fixture
async def two_edges(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[list[Starlette]]:
    """Two edges (two apps, each with its own NATS connections and id generator) on one nats-server."""
    apps = [make_app(default_topology(nats_url=nats_server.url), tmp_path / name) for name in ("a", "b")]
    try:
        yield apps
    finally:
        for app in apps:
            await app.state.edge.cells.close()


async def test_fifty_concurrent_starts_with_one_key_through_two_edges_make_one_execution(
    two_edges: list[Starlette], js: JetStreamContext
) -> None:
    clients = [client_for(app) for app in two_edges]
    await register(clients[0], "demo/once", 1)
    body = {"playbook": {"path": "demo/once"}, "workload": {"order": 7, "items": ["a", "b"]}}
    headers = {**H, "Idempotency-Key": KEY}
    responses = await asyncio.gather(*(clients[i % 2].post(base(), json=body, headers=headers) for i in range(50)))
    for c in clients:
        await c.aclose()

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [202], [r.text for r in responses if r.status_code not in (200, 202)]
    answers = {json.dumps(r.json(), sort_keys=True) for r in responses}
    assert len(answers) == 1  # every answer names the same execution, seq and event
    answer = responses[0].json()
    assert answer["playbook"] == {"path": "demo/once", "version": 1}
    for r in responses:
        assert r.headers["location"].endswith(f"/executions/{answer['execution_id']}")
        assert r.headers.get("idempotent-replayed") == ("true" if r.status_code == 200 else None)

    on_wal = await requested(js)
    assert [(seq, env["execution_id"], env["event_id"]) for seq, env in on_wal] == [
        (answer["seq"], answer["execution_id"], answer["event_id"])
    ]
    assert on_wal[0][1]["payload"] == {"playbook": {"path": "demo/once", "version": 1}, "workload": body["workload"]}
    record = await (await IdempotencyStore.open(js)).get("acme", "web", KEY)
    assert record is not None and (record.execution_id, record.seq) == (answer["execution_id"], answer["seq"])


async def test_same_key_with_another_body_is_409_and_writes_nothing(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    headers = {**H, "Idempotency-Key": KEY}
    first = await client.post(base(), json={"workload": {"n": 1}}, headers=headers)
    assert first.status_code == 202, first.text
    # The digest is of the canonical body: the same workload with its keys in another order is the same request.
    again = await client.post(base(), content=b'{"workload":  {"n": 1}}', headers={**headers, "Content-Type": "application/json"})
    assert again.status_code == 200 and again.json() == first.json()
    before = await requested(js)
    for other in ({"workload": {"n": 2}}, {"workload": {"n": 1}, "affinity": "eu"}, {}):
        problem = assert_problem(await client.post(base(), json=other, headers=headers), 409)
        assert problem["execution_id"] == first.json()["execution_id"] and problem["field"] == "Idempotency-Key"
        assert "another request" in problem["detail"]
    assert await requested(js) == before
    # Scoped by tenant and project: the same key in another project is another execution.
    elsewhere = await client.post(base(project="shop"), json={"workload": {"n": 2}}, headers=headers)
    assert elsewhere.status_code == 202 and elsewhere.json()["execution_id"] != first.json()["execution_id"]
    # Without the header every start is a new execution, as before.
    plain = [await client.post(base(), json={"workload": {"n": 1}}, headers=H) for _ in range(2)]
    assert [p.status_code for p in plain] == [202, 202] and plain[0].json() != plain[1].json()
    assert len(await requested(js)) == len(before) + 3


@pytest.mark.parametrize(
    ("keys", "detail"),
    [([""], "must not be empty"), (["k" * 256], "at most 255 characters"), (["a", "b"], "one Idempotency-Key header")],
)
async def test_bad_keys_are_400_and_write_nothing(
    client: httpx.AsyncClient, js: JetStreamContext, keys: list[str], detail: str
) -> None:
    headers = [("Authorization", H["Authorization"])] + [("Idempotency-Key", k) for k in keys]
    problem = assert_problem(await client.post(base(), json={"workload": {}}, headers=headers), 400)
    assert detail in problem["detail"] and problem["field"] == "Idempotency-Key"
    assert await requested(js) == []
    assert (await js.stream_info("KV_idempotency")).state.messages == 0
    ok = await client.post(base(), json={"workload": {}}, headers={**H, "Idempotency-Key": "k" * 255})
    assert ok.status_code == 202, ok.text


async def test_unknown_playbook_under_a_key_is_404_and_claims_nothing(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    headers = {**H, "Idempotency-Key": KEY}
    body = {"playbook": {"path": "demo/later"}}
    assert_problem(await client.post(base(), json=body, headers=headers), 404)
    assert (await js.stream_info("KV_idempotency")).state.messages == 0
    await register(client, "demo/later", 1)
    assert (await client.post(base(), json=body, headers=headers)).status_code == 202  # the key was still free


async def test_the_answer_survives_a_restart_of_the_edge_and_of_nats(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    topology = default_topology(nats_url=nats_server.url)
    headers = {**H, "Idempotency-Key": KEY}
    first_app = make_app(topology, tmp_path / "first")
    async with client_for(first_app) as c:
        first = await c.post(base(), json={"workload": {"x": 1}}, headers=headers)
    await first_app.state.edge.cells.close()
    assert first.status_code == 202, first.text

    nats_server.stop()
    nats_server.start()  # same store, same port
    second_app = make_app(topology, tmp_path / "second")
    try:
        async with client_for(second_app) as c:
            again = await c.post(base(), json={"workload": {"x": 1}}, headers=headers)
            other = await c.post(base(), json={"workload": {"x": 2}}, headers=headers)
    finally:
        await second_app.state.edge.cells.close()
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert_problem(other, 409)


def _run_args(url: str, path: Path, *extra: str) -> list[str]:
    return ["run", str(path), "--tenant", "acme", "--project", "web", "--nats-url", url, *extra]


async def test_cli_run_idempotency_key(nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "once.yaml"
    path.write_text("path: demo/cli-once\nversion: 1\nsteps:\n  - {name: a, tool: {kind: noop, result: 1}}\n")
    key = ["--idempotency-key", KEY]
    first = json.loads(cli(*_run_args(nats_server.url, path, *key, "--workload", '{"n": 1}')).stdout)
    again = json.loads(cli(*_run_args(nats_server.url, path, *key, "--workload", '{"n": 1}')).stdout)
    assert first["replayed"] is False and again["replayed"] is True
    assert {k: v for k, v in again.items() if k != "replayed"} == {k: v for k, v in first.items() if k != "replayed"}

    conflict = cli(*_run_args(nats_server.url, path, *key, "--workload", '{"n": 2}'), check=False)
    assert conflict.returncode == 2 and conflict.stdout == ""
    assert conflict.stderr.strip().splitlines()[-1].startswith("noetl-edge: error: --idempotency-key: the idempotency key")
    bad = cli(*_run_args(nats_server.url, path, "--idempotency-key", ""), check=False)
    assert bad.returncode == 2 and "--idempotency-key: an idempotency key must not be empty" in bad.stderr
    plain = json.loads(cli(*_run_args(nats_server.url, path)).stdout)
    assert "replayed" not in plain and plain["execution_id"] != first["execution_id"]

    on_wal = await requested(js)
    assert sorted(env["execution_id"] for _, env in on_wal) == sorted([first["execution_id"], plain["execution_id"]])
    # The API and the CLI share the store: the same key and request through the edge is the CLI's execution.
    app = make_app(default_topology(nats_url=nats_server.url), tmp_path / "edge")
    try:
        async with client_for(app) as c:
            body = {"playbook": {"path": "demo/cli-once", "version": 1}, "workload": {"n": 1}}
            through_edge = await c.post(base(), json=body, headers={**H, "Idempotency-Key": KEY})
    finally:
        await app.state.edge.cells.close()
    assert through_edge.status_code == 200, through_edge.text
    assert (through_edge.json()["execution_id"], through_edge.json()["seq"]) == (first["execution_id"], first["seq"])


async def test_a_key_past_the_window_starts_a_new_execution(nats_server: EmbeddedServer, nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    await bootstrap(js, default_topology(), settings=StreamSettings(idempotency_window_s=1))  # NOETL_IDEMPOTENCY_WINDOW=1
    store = await IdempotencyStore.open(js)
    app = make_app(default_topology(nats_url=nats_server.url), tmp_path)
    headers = {**H, "Idempotency-Key": KEY}
    try:
        async with client_for(app) as c:
            first = await c.post(base(), json={"workload": {"n": 1}}, headers=headers)
            again = await c.post(base(), json={"workload": {"n": 1}}, headers=headers)
            assert (first.status_code, again.status_code) == (202, 200)
            assert again.json()["execution_id"] == first.json()["execution_id"]
            deadline = asyncio.get_running_loop().time() + 30
            while await store.get("acme", "web", KEY) is not None:  # NATS forgets the key at the bucket's max_age
                assert asyncio.get_running_loop().time() < deadline, "the key was never forgotten"
                await asyncio.sleep(0.2)
            later = await c.post(base(), json={"workload": {"n": 2}}, headers=headers)  # any body: the key is free
            assert later.status_code == 202 and "idempotent-replayed" not in later.headers
            assert later.json()["execution_id"] != first.json()["execution_id"]
            replay = await c.post(base(), json={"workload": {"n": 2}}, headers=headers)
            assert replay.status_code == 200 and replay.json() == later.json()
    finally:
        await app.state.edge.cells.close()
    assert sorted(env["execution_id"] for _, env in await requested(js)) == sorted(
        [first.json()["execution_id"], later.json()["execution_id"]]
    )


async def test_fifty_concurrent_starts_through_two_hypercorn_edges(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, procs: list[Proc]
) -> None:
    """The same race through two `noetl-edge edge` processes (Hypercorn, real HTTP) on one nats-server."""
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump({"tokens": [{"name": "ops", "token": "s3cr3t-ops", "tenants": ["*"], "role": "admin"}]}))
    env = serve_env(NOETL_TOKENS_FILE=str(tokens_file))
    urls = []
    for name in ("one", "two"):
        edge, http = start_edge(procs, tmp_path, "--nats-url", nats_server.url, "--data-dir", str(tmp_path / name), env=env)
        await wait_listening(http, edge)
        urls.append(http)
    clients = [serve_client(url, "s3cr3t-ops") for url in urls]
    try:
        body = {"workload": {"order": 11}}
        responses = await asyncio.gather(
            *(clients[i % 2].post(base(), json=body, headers={"Idempotency-Key": KEY}) for i in range(50))
        )
    finally:
        for c in clients:
            await c.aclose()
    assert sorted(r.status_code for r in responses) == [200] * 49 + [202], [r.text for r in responses]
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 49
    on_wal = await requested(js)
    assert [env["execution_id"] for _, env in on_wal] == [responses[0].json()["execution_id"]]
