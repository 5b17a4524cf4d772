"""The keychain end to end through a real ``noetl-edge up``: a credential referenced by alias, resolved on the worker only.

A loopback HTTP server plays the third-party API; it records the headers it
receives and echoes the credential back (a careless API). After the runs,
the secret's bytes and its base64 are looked for, raw, in every message of
every stream (WAL, CMD, DLQ, every KV and object bucket — the keychain's own
bucket holds it encrypted), every file under the objects directory, the
``up`` process's log, every HTTP response and an SSE stream read from seq 0.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from worker.keychain import Keychain, PlatformKey, Scope
from locator.command import Command, command_encoder, command_id
from locator.ids import Snowflake
from locator.shard import shard_for
from locator.subjects import cmd_subject, wal_stream
from tests.conftest import cli_path
from tests.e2e.conftest import (
    Stack,
    check_invariant,
    e2e_env,
    ended,
    executions_url,
    has,
    up_stack,
    wait_for_wal,
)
from tests.http_servers import serving

TENANT, OTHER = "keys", "keys-b"
SEEN: list[dict[str, str]] = []


class _Api(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        SEEN.append(headers)
        body = msgspec.json.encode({"you_sent": headers.get("authorization")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    with serving(_Api) as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``noetl-edge up`` whose policy allows the loopback API (the shared fixture's does not)."""
    base = tmp_path_factory.mktemp("up-keychain")
    data_dir = base / "data"
    env = e2e_env(NOETL_DATA_DIR=str(data_dir), NOETL_NATS_PORT="0", NOETL_HTTP_PORT="0", NOETL_HTTP_HOSTS="127.0.0.1")
    env.pop("NOETL_KEYCHAIN_KEY", None)
    data_dir.mkdir()
    PlatformKey.from_env(data_dir=data_dir, env={}, create=True)  # what `up` does on its first start
    with up_stack(data_dir, base, env=env) as running:
        yield running


def forms(secret: str) -> list[bytes]:
    """The secret and every base64 spelling of it that masking promises to hide."""
    raw = secret.encode()
    out = {raw}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        out |= {encoded, encoded.rstrip(b"=")}
    return sorted(out)


def playbook(api: str, version: int, *, alias: str = "api") -> dict[str, Any]:
    return {
        "path": "e2e/keychain", "version": version,
        "steps": [
            {"name": "call", "tool": {"kind": "http", "url": f"{api}/v1/me", "auth": {"type": "bearer", "credential": alias}},
             "next": [{"step": "reveal"}]},
            # pad: a result over the payload cap, stored by reference in the objects directory.
            {"name": "reveal", "tool": {"kind": "python", "call": "examples.tools.credentials:reveal",
                                        "credentials": {"api": alias}, "args": {"pad": 9000}}},
        ],
    }  # fmt: skip


class Recorder:
    """Every HTTP response body the test reads, to be searched for the secret afterwards."""

    def __init__(self, edge: httpx.AsyncClient) -> None:
        self.edge = edge
        self.bodies: list[bytes] = []

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        resp = await self.edge.request(method, url, **kw)
        self.bodies.append(resp.content + json.dumps(dict(resp.headers)).encode())
        return resp

    async def sse(self, url: str, count: int) -> list[dict[str, Any]]:
        """The first ``count`` SSE events of ``url`` from seq 0."""
        raw = bytearray()
        out: list[dict[str, Any]] = []
        async with self.edge.stream("GET", url, params={"after_seq": 0}, timeout=30) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                raw += line.encode() + b"\n"
                if line.startswith("data: "):
                    out.append(json.loads(line[len("data: "):]))
                    if len(out) == count:
                        break
        self.bodies.append(bytes(raw))
        return out


async def run_once(stack: Stack, js: JetStreamContext, rec: Recorder, api: str, version: int) -> dict[str, Any]:
    base = f"/api/v1/tenants/{TENANT}/projects/web"
    put = await rec.request("PUT", f"{base}/playbooks/e2e/keychain", json=playbook(api, version))
    assert put.status_code == 201, put.text
    start = await rec.request("POST", f"{base}/executions", json={"playbook": {"path": "e2e/keychain", "version": version}})
    assert start.status_code in (201, 202), start.text
    execution_id = start.json()["execution_id"]
    events = await wait_for_wal(js, TENANT, "web", execution_id, ended, why=stack.proc.logs)
    assert events[-1].env.type == "execution.completed", [(e.env.type, e.env.payload) for e in events]
    projection = await check_invariant(js, rec.edge, TENANT, "web", execution_id)
    url = executions_url(TENANT, "web", execution_id)
    got = await rec.request("GET", url)
    page = await rec.request("GET", url + "/events", params={"limit": 1000})
    timeline = await rec.request("GET", url + "/timeline", params={"limit": 1000})
    result = await rec.request("GET", url + "/steps/reveal/result")
    assert {got.status_code, page.status_code, timeline.status_code, result.status_code} == {200}, (page.text, result.text)
    streamed = await rec.sse(url + "/stream", len(events))
    assert len(streamed) == len(events)
    exits = {e.env.step: e.env for e in events if e.env.type == "step.exit"}
    return {"id": execution_id, "projection": projection, "exits": exits, "timeline": timeline.json(),
            "result": result.content, "got": got.json()}  # fmt: skip


async def every_stored_message(js: JetStreamContext) -> list[tuple[str, bytes]]:
    """(stream, subject + headers + data) of every message of every stream, read raw."""
    out: list[tuple[str, bytes]] = []
    streams = await js.streams_info()
    names = sorted(s.config.name for s in streams if s.config.name)
    assert {"KV_keychain", "KV_catalog", "OBJ_plugins", f"WAL_{shard_for(TENANT, 'web', '', 4)}"} <= set(names), names
    for info in streams:
        name = info.config.name
        assert name is not None
        if not info.state.messages:
            continue
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(name, seq)
            except NotFoundError:  # deleted (acked commands, KV history beyond its limit)
                continue
            out.append((name, msg.subject.encode() + json.dumps(msg.headers or {}).encode() + (msg.data or b"")))
    return out


async def test_a_bearer_credential_reaches_the_api_and_nothing_else_then_rotates(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, api: str
) -> None:
    rec = Recorder(edge)
    keychain = Keychain(stack_js, PlatformKey.from_env(data_dir=stack.data_dir, env={}))
    first, second = "sk-live-" + secrets.token_hex(16), "sk-live-" + secrets.token_hex(16)
    await keychain.set(Scope(TENANT, "web"), "api", first.encode())

    one = await run_once(stack, stack_js, rec, api, 1)
    assert SEEN[-1]["authorization"] == f"Bearer {first}"
    reveal = one["projection"].steps["reveal"]
    assert reveal.result is None and reveal.result_ref  # stored by reference, masked before it was stored
    stored = json.loads(one["result"])["result"]
    assert stored["value"] == "***" and stored["copies"][:2] == ["0:***", "1:***"] and len(stored["copies"]) == 9000
    assert one["got"]["steps"]["call"]["result"]["body"] == {"you_sent": "Bearer ***"}
    for step in ("call", "reveal"):
        assert one["exits"][step].payload["credentials"] == ["api@1"], one["exits"][step].payload
    rows = {row["step"]: row for row in one["timeline"]["rows"] if row["type"] == "step.exit"}
    assert "using api@1" in rows["call"]["summary"] and rows["call"]["payload"]["credentials"] == ["api@1"]
    # The command carried the alias only.
    issued = [e.env.payload for e in await _events(stack_js, one["id"]) if e.env.type == "command.issued"]
    assert issued and all(first not in json.dumps(p) for p in issued)

    # Rotation: set again, run again: version 2 recorded, the API gets the new value.
    await keychain.set(Scope(TENANT, "web"), "api", second.encode())
    two = await run_once(stack, stack_js, rec, api, 2)
    assert SEEN[-1]["authorization"] == f"Bearer {second}"
    assert [two["exits"][s].payload["credentials"] for s in ("call", "reveal")] == [["api@2"], ["api@2"]]

    # replay shows which version a run used.
    replay = subprocess.run([cli_path(), "replay", f"noetl://{TENANT}/web/executions/{two['id']}", "--json",
                             "--nats-url", stack.nats_url, "--data-dir", str(stack.data_dir)],
                            capture_output=True, env=stack.env(), timeout=60)  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert b'"api@2"' in replay.stdout

    # Nowhere: every stream raw, the objects directory, the process log, every response, the SSE streams.
    haystacks: list[tuple[str, bytes]] = list(await every_stored_message(stack_js))
    objects = [p for p in (stack.data_dir / "objects").rglob("*") if p.is_file()]
    assert objects, "the big result was stored by reference"
    haystacks += [(str(p), p.read_bytes()) for p in objects]
    haystacks.append(("up stderr", stack.proc.log_path.read_bytes()))
    haystacks.append(("replay output", replay.stdout + replay.stderr))
    haystacks += [(f"response {i}", body) for i, body in enumerate(rec.bodies)]
    assert any(name == "KV_keychain" for name, _ in haystacks)
    for secret in (first, second):
        for form in forms(secret):
            leaks = [name for name, data in haystacks if form in data]
            assert not leaks, f"{form!r} found in {leaks}"


async def _events(js: JetStreamContext, execution_id: str) -> list[Any]:
    from tests.e2e.conftest import wal_events

    return await wal_events(js, TENANT, "web", execution_id)


async def test_another_tenants_alias_is_refused_at_register_and_on_the_worker(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, api: str, tmp_path: Path
) -> None:
    keychain = Keychain(stack_js, PlatformKey.from_env(data_dir=stack.data_dir, env={}))
    b_secret = "b-only-" + secrets.token_hex(16)
    await keychain.set(Scope(OTHER, "web"), "bonly", b_secret.encode())
    doc = playbook(api, 1, alias="bonly")

    # Register time, over HTTP and with the CLI: 422 / exit 2 naming the path, nothing written.
    base = f"/api/v1/tenants/{TENANT}/projects/iso"
    put = await edge.put(f"{base}/playbooks/e2e/keychain", json=doc)
    assert put.status_code == 422 and put.headers["content-type"].startswith("application/problem+json"), put.text
    assert put.json()["field"] == "steps[0].tool.auth.credential"
    assert "unknown credential 'bonly' in keys/iso" in put.json()["detail"]
    path = tmp_path / "pb.yaml"
    path.write_text(json.dumps(doc))
    env = stack.env(NOETL_HTTP_HOSTS="127.0.0.1")
    for args in (["playbook", "register", str(path)], ["run", str(path), "--wait"]):
        proc = subprocess.run([cli_path(), *args, "--tenant", TENANT, "--project", "iso", "--nats-url", stack.nats_url],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "steps[0].tool.auth.credential: unknown credential 'bonly' in keys/iso" in lines[0]
    assert (await edge.get(f"{base}/playbooks")).json() == {"playbooks": []}
    shard = shard_for(TENANT, "iso", "", 4)
    with pytest.raises(NotFoundError):
        await stack_js.get_msg(wal_stream(shard), seq=1, next=True, subject=f"wal.{shard}.{TENANT}.iso.>")

    # A command forged straight onto CMD_<shard> for tenant A naming B's alias: the worker resolves in A's scope only.
    execution_id = Snowflake().next_str()
    seen_before = len(SEEN)
    for step, tool in (
        ("http", {"kind": "http", "url": f"{api}/v1/me", "auth": {"type": "bearer", "credential": "bonly"}}),
        ("py", {"kind": "python", "call": "examples.tools.credentials:reveal", "credentials": {"api": "bonly"}}),
    ):
        forged = Command(
            v=1, command_id=command_id(execution_id, step, None, 1), execution_id=execution_id, tenant=TENANT,
            project="iso", affinity="", step=step, iteration=None, attempt=1, tool=tool,
        )  # fmt: skip
        await stack_js.publish(cmd_subject(shard, "shared"), command_encoder.encode(forged),
                               headers={"Nats-Msg-Id": forged.command_id})  # fmt: skip
    events = await wait_for_wal(stack_js, TENANT, "iso", execution_id, has("call.error", 2), why=stack.proc.logs)
    errors = {e.env.step: e.env.payload["error"] for e in events if e.env.type == "call.error"}
    assert errors == {
        "http": {"type": "credential", "message": "unknown credential 'bonly' in keys/iso"},
        "py": {"type": "credential", "message": "unknown credential 'bonly' in keys/iso"},
    }
    assert not any(e.env.type == "step.exit" for e in events)
    assert len(SEEN) == seen_before  # the API was never called, with B's value or any
    raw = b"".join(data for _, data in await every_stored_message(stack_js))
    assert all(form not in raw for form in forms(b_secret))
