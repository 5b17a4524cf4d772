"""The edge through real processes: ``noetl-edge up`` / ``noetl-edge edge`` (Hypercorn) over real HTTP.

Every wait is bounded (``asyncio.wait_for`` or a deadline), so a hang fails fast
with the server's stderr attached instead of running into the suite timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import yaml

from worker.keychain import PlatformKey
from kernel.bootstrap import bootstrap
from kernel.connect import close, connect
from natscluster.server import EmbeddedServer, free_port
from locator import shard_for
from locator.topology import Cell, make_topology
from projector.projection import canonical, decode_projection
from projector.replay import replay


SHARDS = 4
TENANT, PROJECT = "acme", "web"
BASE = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}/executions"
PROBLEM = "application/problem+json"
STEP = 15.0  # bound on any single wait (a ready line, one SSE event, a fold)


# --------------------------------------------------------------------------- processes


def cli_path() -> str:
    return str(Path(sys.executable).parent / "noetl-edge")


def cli_env(**extra: str) -> dict[str, str]:
    """The installed CLI's environment: ours without NOETL_* (as tests/conftest.py does), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")} | extra


class Proc:
    """A ``noetl-edge`` subprocess: stdout lines through a reader thread, stderr to a file."""

    def __init__(self, args: list[str], *, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            [cli_path(), *args], stdout=subprocess.PIPE, stderr=self._err, text=True, env=env or cli_env()
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # EOF

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text()

    def line(self, timeout: float = STEP) -> str:
        """The next stdout line (bounded); fails with stderr when the process says nothing or dies."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stdout line within {timeout}s; stderr:\n{self.stderr()[-4000:]}") from None
        assert line, f"process exited ({self.proc.poll()}) before printing; stderr:\n{self.stderr()[-4000:]}"
        return line.rstrip("\n")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not exit within {timeout}s of SIGTERM; stderr:\n{self.stderr()[-4000:]}") from None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)  # EOF once the process is gone
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._err.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; any still running at teardown are killed."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.cleanup()


class UpInfo(NamedTuple):
    proc: Proc
    nats_url: str
    http: str
    data: Path
    token: str


def start_up(procs: list[Proc], tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> UpInfo:
    data = tmp_path / "data"
    up = Proc(["up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0", *args], log=tmp_path / "up.stderr", env=env)
    procs.append(up)
    # up says ready once the kernel and its edge child both are: two interpreters starting on a loaded CI host.
    words = up.line(timeout=60).split()
    assert len(words) == 3 and words[0] == "ready", words
    assert words[1].startswith("nats://") and words[2].startswith("http://"), words
    return UpInfo(up, words[1], words[2], data, (data / "token").read_text().strip())


def start_edge(procs: list[Proc], tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    bind = f"127.0.0.1:{free_port()}"
    edge = Proc(["edge", "--bind", bind, *args], log=tmp_path / f"edge-{len(procs)}.stderr", env=env)
    procs.append(edge)
    assert edge.line() == f"ready http://{bind}"
    return edge, f"http://{bind}"


async def wait_listening(http: str, proc: Proc, timeout: float = STEP) -> None:
    """Poll ``/healthz`` until it answers 200: ``ready`` is printed before Hypercorn has bound its socket."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=http, timeout=2.0) as client:
        while True:
            assert proc.proc.poll() is None, f"edge exited {proc.proc.returncode}; stderr:\n{proc.stderr()[-4000:]}"
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{http} not listening after {timeout}s; stderr:\n{proc.stderr()[-4000:]}"
            await asyncio.sleep(0.05)


def client_for(http: str, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=http, headers=headers, timeout=httpx.Timeout(STEP))


# --------------------------------------------------------------------------- API helpers


async def start_execution(client: httpx.AsyncClient, base: str = BASE) -> tuple[str, int]:
    r = await client.post(base, json={"workload": {"rows": 3}})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"{base}/{body['execution_id']}"
    return body["execution_id"], body["seq"]


async def publish(client: httpx.AsyncClient, execution_id: str, events: list[dict[str, Any]], base: str = BASE) -> list[dict[str, Any]]:
    r = await client.post(f"{base}/{execution_id}/events", json=events)
    assert r.status_code == 200, r.text
    acks: list[dict[str, Any]] = r.json()["acks"]
    assert len(acks) == len(events) and not any(a["duplicate"] for a in acks), acks
    return acks


async def fresh_fold(nats_url: str, execution_id: str, tenant: str = TENANT, project: str = PROJECT) -> bytes:
    nc = await connect([nats_url], name="pytest-fold")
    try:
        p = await replay(
            nc.jetstream(), shard=shard_for(tenant, project, "", SHARDS), shard_count=SHARDS,
            tenant=tenant, project=project, execution_id=execution_id,
        )
    finally:
        await close(nc)
    assert p is not None
    return canonical(p)


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    doc: dict[str, Any] = r.json()
    assert doc["status"] == status and doc["title"] and doc["detail"] and doc["instance"] == r.request.url.path
    return doc


STEP_EVENTS: list[dict[str, Any]] = [
    {"type": "execution.started"},
    {"type": "step.enter", "step": "fetch", "attempt": 1},
    {"type": "step.exit", "step": "fetch", "attempt": 1, "payload": {"rows": 3}},
    {"type": "user.note", "payload": {"hello": "world"}},
]


# --------------------------------------------------------------------------- a. end to end


@pytest.mark.slow
async def test_up_serves_projections_over_http_and_a_second_edge_agrees(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path)
    token_file = up.data / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"admin token for the HTTP API is in {token_file}" in up.proc.stderr()
    key_file = up.data / "keychain.key"  # the keychain's platform key, created on the first start like the token
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert up.proc.stderr().count(f"platform key for the keychain is in {key_file}") == 1
    await wait_listening(up.http, up.proc)

    async with client_for(up.http, up.token) as client:
        # The admin token may store a credential; the edge wraps it under the key up created.
        r = await client.put("/api/v1/tenants/acme/projects/web/credentials/api", content=b"up-secret-1")
        assert r.status_code == 201 and r.json()["key_id"] == PlatformKey.from_file(key_file).id, r.text
        assert b"up-secret-1" not in r.content
        execution_id, first_seq = await start_execution(client)
        acks = await publish(client, execution_id, STEP_EVENTS)
        last = acks[-1]["seq"]
        assert first_seq < acks[0]["seq"] < last

        # Read-your-writes: min_seq is honoured at once, whoever folded it.
        r = await client.get(f"{BASE}/{execution_id}", params={"min_seq": last})
        assert r.status_code == 200, r.text
        assert r.json()["last_seq"] >= last and r.headers["etag"] == f'"{last}"'
        assert r.headers["x-noetl-source"] in ("cache", "snapshot", "replay")

        # The kernel folds it into the KV cache; then the edge serves it from there.
        deadline = time.monotonic() + STEP
        while True:
            r = await client.get(f"{BASE}/{execution_id}")
            assert r.status_code == 200, r.text
            if r.headers["x-noetl-source"] == "cache" and r.headers["etag"] == f'"{last}"':
                break
            assert time.monotonic() < deadline, f"not folded into the cache: {r.headers}; {up.proc.stderr()[-2000:]}"
            await asyncio.sleep(0.1)
        body = r.content
        projection = decode_projection(body)
        assert (projection.status, projection.steps["fetch"].status, projection.event_count) == ("RUNNING", "COMPLETED", 5)
        assert canonical(projection) == await fresh_fold(up.nats_url, execution_id)
        assert (await client.get(f"{BASE}/{execution_id}", headers={"If-None-Match": f'"{last}"'})).status_code == 304

        async with client_for(up.http, None) as anonymous:
            r = await anonymous.get(f"{BASE}/{execution_id}")
            assert_problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = await anonymous.get(f"{BASE}/{execution_id}", headers={"Authorization": "Bearer wrong"})
            assert_problem(r, 401)
            assert (await anonymous.get("/healthz")).status_code == 200
            ready = await anonymous.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
            metrics = await anonymous.get("/metrics")
            assert metrics.status_code == 200
            assert 'noetl_edge_requests_total{method="GET",route="/api/v1/tenants/{tenant}/projects/{project}' in metrics.text
            assert 'noetl_shard_reachable{shard="0"} 1.0' in metrics.text

        # A second, stateless edge (no kernel, no shared memory) serves the same bytes.
        edge, http2 = start_edge(procs, tmp_path, "--nats-url", up.nats_url, "--data-dir", str(up.data))
        await wait_listening(http2, edge)
        async with client_for(http2, up.token) as client2:
            r2 = await client2.get(f"{BASE}/{execution_id}")
            assert r2.status_code == 200, r2.text
            assert r2.content == body and r2.headers["x-noetl-source"] == "cache"
            # Writes through one edge are read back through the other.
            more = await publish(client2, execution_id, [{"type": "user.note", "payload": {"n": 2}}])
            r1 = await client.get(f"{BASE}/{execution_id}", params={"min_seq": more[0]["seq"]})
            assert r1.status_code == 200 and r1.json()["last_seq"] == more[0]["seq"], r1.text
            assert canonical(decode_projection(r1.content)) == await fresh_fold(up.nats_url, execution_id)

    assert edge.terminate() == 0, edge.stderr()[-4000:]
    assert up.proc.terminate() == 0, up.proc.stderr()[-4000:]


# --------------------------------------------------------------------------- b. SSE


class Sse(NamedTuple):
    id: int
    event: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """Parse a text/event-stream body; comments and field-less blocks (``retry:``) are skipped."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield Sse(int(fields["id"]), fields["event"], json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def next_event(events: AsyncIterator[Sse]) -> Sse:
    return await asyncio.wait_for(anext(events), STEP)


def check(event: Sse, ack: dict[str, Any], execution_id: str) -> None:
    assert event.id == ack["seq"], (event, ack)
    assert event.data["event_id"] == ack["event_id"], (event, ack)
    assert event.event == event.data["type"] and event.data["execution_id"] == execution_id


@pytest.mark.slow
async def test_sse_delivers_history_live_events_and_resumes_without_gaps(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path)
    await wait_listening(up.http, up.proc)
    async with client_for(up.http, up.token) as client:
        r = await client.post(BASE, json={})
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        other_id, _ = await start_execution(client)  # same shard, interleaved: must never show up
        history = [r.json()] + await publish(client, execution_id, STEP_EVENTS[:2])
        url = f"{BASE}/{execution_id}/stream"
        seen: list[Sse] = []

        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
            # No Last-Event-ID: the whole history first.
            for ack in history:
                seen.append(await next_event(events))
                check(seen[-1], ack, execution_id)
            assert seen[0].event == "execution.requested"
            # Then each event as it is published.
            for doc in STEP_EVENTS[2:] + [{"type": "user.live", "payload": {"i": 0}}]:
                await publish(client, other_id, [{"type": "user.noise"}])
                (ack,) = await publish(client, execution_id, [doc])
                seen.append(await next_event(events))
                check(seen[-1], ack, execution_id)
        last_seen = seen[-1].id

        # Disconnected: more events (and other executions' events in between).
        missed: list[dict[str, Any]] = []
        for i in range(4):
            await publish(client, other_id, [{"type": "user.noise"}])
            missed += await publish(client, execution_id, [{"type": "user.offline", "payload": {"i": i}}])

        async with client.stream("GET", url, headers={"Last-Event-ID": str(last_seen)}) as response:
            assert response.status_code == 200
            events = sse_events(response)
            for ack in missed:
                seen.append(await next_event(events))
                check(seen[-1], ack, execution_id)
            for i in range(2):
                (ack,) = await publish(client, execution_id, [{"type": "user.live", "payload": {"i": i + 1}}])
                seen.append(await next_event(events))
                check(seen[-1], ack, execution_id)
            # Nothing more: no repeats trail behind.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(anext(events), 1.0)

        ids = [e.id for e in seen]
        assert ids == sorted(set(ids)), ids  # in order, each once
        page = (await client.get(f"{BASE}/{execution_id}/events", params={"limit": 1000})).json()
        assert ids == [e["seq"] for e in page["events"]]  # no gaps: exactly the execution's WAL events
        assert [e.data for e in seen] == [e["event"] for e in page["events"]]

        # A Last-Event-ID at the end resumes with nothing but what comes next.
        async with client.stream("GET", url, headers={"Last-Event-ID": str(ids[-1])}) as response:
            events = sse_events(response)
            (ack,) = await publish(client, execution_id, [{"type": "user.tail"}])
            check(await next_event(events), ack, execution_id)

        bad = await client.get(url, headers={"Last-Event-ID": "yesterday"})
        assert_problem(bad, 422)
    assert up.proc.terminate() == 0


# --------------------------------------------------------------------------- c. a cell that is down


def tenants_by_shard() -> dict[int, str]:
    out: dict[int, str] = {}
    i = 0
    while len(out) < SHARDS:
        out.setdefault(shard_for(f"t{i}", PROJECT, "", SHARDS), f"t{i}")
        i += 1
    return out


@pytest.mark.slow
async def test_a_cell_that_is_down_gives_503_for_its_shards_only(
    tmp_path: Path, procs: list[Proc], nats_server: EmbeddedServer
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens here
    topology = make_topology(
        shard_count=SHARDS,
        replicas=1,
        cells=[Cell(name="a", urls=(nats_server.url,), shards=(0, 1)), Cell(name="b", urls=(dead,), shards=(2, 3))],
    )
    nc = await connect([nats_server.url], name="pytest")
    try:
        await bootstrap(nc.jetstream(), topology, shards=[0, 1])
    finally:
        await close(nc)
    topology_file = tmp_path / "topology.yaml"
    topology_file.write_text(
        yaml.safe_dump(
            {
                "shard_count": SHARDS,
                "cells": [
                    {"name": "a", "urls": [nats_server.url], "shards": ["0-1"]},
                    {"name": "b", "urls": [dead], "shards": ["2-3"]},
                ],
            }
        )
    )
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump({"tokens": [{"name": "ops", "token": "s3cr3t-ops", "tenants": ["*"], "role": "admin"}]}))
    env = cli_env(NOETL_TOKENS_FILE=str(tokens_file))
    edge, http = start_edge(procs, tmp_path, "--topology", str(topology_file), "--data-dir", str(tmp_path / "edge"), env=env)
    await wait_listening(http, edge)

    tenants = tenants_by_shard()
    async with client_for(http, "s3cr3t-ops") as client:
        for shard, tenant in sorted(tenants.items()):
            base = f"/api/v1/tenants/{tenant}/projects/{PROJECT}/executions"
            r = await client.get(f"{base}/123")
            if shard in (0, 1):
                assert_problem(r, 404)  # cell a answered: there is no such execution
                execution_id, _ = await start_execution(client, base)
                await publish(client, execution_id, [{"type": "user.ok"}], base)
                r = await client.get(f"{base}/{execution_id}", params={"min_seq": 1})
                assert r.status_code == 200 and r.json()["event_count"] == 2, r.text
            else:
                doc = assert_problem(r, 503)
                assert "cell 'b'" in doc["detail"] and int(r.headers["retry-after"]) > 0
                assert_problem(await client.post(base, json={}), 503)
                assert_problem(await client.get(f"{base}/123/stream"), 503)
                assert_problem(await client.get(f"{base}/123/events"), 503)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert ready.json()["cells"] == {"a": True, "b": False}
        assert [p.split(":")[0] for p in ready.json()["problems"]] == ["cell b"]
        metrics = (await client.get("/metrics")).text
        for shard in range(SHARDS):
            assert f'noetl_shard_reachable{{shard="{shard}"}} {1.0 if shard < 2 else 0.0}' in metrics
    assert edge.terminate() == 0, edge.stderr()[-4000:]
