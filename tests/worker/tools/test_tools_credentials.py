"""Credentials on the data worker: resolved in the command's own scope right before the call, masked on the way out.

Real nats-server (the ``js`` fixture bootstraps the ``keychain`` bucket), a real
:class:`~worker.keychain.Keychain`, a real loopback HTTP server; commands go
through :class:`ToolRunner` as the worker hands them over, and once through a
:class:`~worker.worker.Worker` consuming ``CMD_<shard>``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import structlog
from nats.js import JetStreamContext

from worker.keychain import Keychain, PlatformKey, Scope
from kernel.logs import configure_logging
from worker.worker import Reported
from locator.command import Command, command_id
from system_playbooks.orchestrate.catalog import Catalog, UnknownCredential
from system_playbooks.orchestrate.playbook import Policy
from worker.tools.runner import ToolError, ToolRunner
from locator.subjects import CATALOG_BUCKET
from locator.topology import Topology
from tests.http_servers import serving

POLICY = Policy(python_allow=("examples.tools.",), http_hosts=("127.0.0.1",))
SEEN: list[dict[str, str]] = []


class _Echo(BaseHTTPRequestHandler):
    """Records the request headers and echoes the credential-bearing ones back (a careless API)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        SEEN.append(headers)
        body = msgspec.json.encode({"auth": headers.get("authorization"), "key": headers.get("x-api-key")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo() -> Iterator[str]:
    SEEN.clear()
    with serving(_Echo) as url:
        yield url


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    d = tmp_path / "worker"
    d.mkdir()
    PlatformKey.from_env(data_dir=d, env={}, create=True)
    return d


async def bound(js: JetStreamContext, topology: Topology, data_dir: Path | None) -> ToolRunner:
    runner = ToolRunner(POLICY, data_dir=data_dir, env={})
    runner.bind(js, topology)
    return runner


def command(tool: dict[str, Any], *, tenant: str = "acme", project: str = "web", step: str = "s") -> Command:
    return Command(
        v=1, command_id=command_id("7", step, None, 1), execution_id="7", tenant=tenant, project=project,
        affinity="", step=step, iteration=None, attempt=1, tool=tool,
    )  # fmt: skip


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("=")]


async def test_bearer_basic_and_header_auth_send_the_value_and_mask_the_echo(
    js: JetStreamContext, topology: Topology, key_dir: Path, echo: str
) -> None:
    keychain = Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={}))
    token, password = "tok-" + secrets.token_hex(12), "pw-" + secrets.token_hex(12)
    await keychain.set(Scope("acme", "web"), "api", token.encode())
    await keychain.set(Scope("acme", "web"), "svc", f"ada:{password}".encode())
    runner = await bound(js, topology, key_dir)

    out = await runner(command({"kind": "http", "url": f"{echo}/", "auth": {"type": "bearer", "credential": "api"}}), attempt=1)
    assert SEEN[-1]["authorization"] == f"Bearer {token}"
    assert isinstance(out, Reported) and out.payload == {"credentials": ["api@1"]}
    assert out.value["body"] == {"auth": "Bearer ***", "key": None}

    out = await runner(command({"kind": "http", "url": f"{echo}/", "auth": {"type": "basic", "credential": "svc"}}), attempt=1)
    basic = base64.b64encode(f"ada:{password}".encode()).decode()
    assert SEEN[-1]["authorization"] == f"Basic {basic}"
    assert out.payload == {"credentials": ["svc@1"]} and out.value["body"]["auth"].startswith("Basic ***")
    assert basic.rstrip("=") not in msgspec.json.encode(out.value).decode()

    tool = {"kind": "http", "url": f"{echo}/", "auth": {"type": "header", "credential": "api", "header": "X-Api-Key"}}
    out = await runner(command(tool), attempt=1)
    assert SEEN[-1]["x-api-key"] == token and "authorization" not in SEEN[-1]
    assert out.value["body"] == {"auth": None, "key": "***"}
    encoded = msgspec.json.encode(out.value).decode()
    assert all(form not in encoded for form in forms(token) + forms(password))


async def test_a_python_tool_gets_its_credentials_and_returning_them_returns_the_mask(
    js: JetStreamContext, topology: Topology, key_dir: Path
) -> None:
    keychain = Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={}))
    token = "tok-" + secrets.token_hex(12)
    await keychain.set(Scope("acme", "web"), "api", b"old")
    await keychain.set(Scope("acme", "web"), "api", token.encode())  # a rotation: the newest version is used
    runner = await bound(js, topology, key_dir)
    tool = {"kind": "python", "call": "examples.tools.credentials:reveal", "credentials": {"api": "api"}, "args": {"pad": 2}}
    out = await runner(command(tool), attempt=1)
    assert isinstance(out, Reported) and out.payload == {"credentials": ["api@2"]}
    assert out.value == {"value": "***", "copies": ["0:***", "1:***"]}

    # Its base64 too, and in an Arrow table (a result stored by reference), and in what it raises.
    b64 = base64.b64encode(token.encode()).decode()
    table = pa.table({"v": [token, b64, "plain"]})
    masked = runner_mask_of(await runner(command({**tool, "call": "examples.tools.credentials:table_of",
                                                  "args": {"rows": [token, b64, "plain"]}}), attempt=1))
    assert masked.column("v").to_pylist() == ["***", "***", "plain"] and table.column("v")[0].as_py() == token
    with pytest.raises(ToolError) as info:
        await runner(command({**tool, "call": "examples.tools.credentials:fail_with", "args": {}}), attempt=1)
    assert info.value.type == "ValueError" and token not in info.value.message and "***" in info.value.message
    assert info.value.report == {"credentials": ["api@2"]}


def runner_mask_of(out: Any) -> pa.Table:
    assert isinstance(out, Reported) and isinstance(out.value, pa.Table)
    return out.value


async def test_log_lines_written_during_the_call_are_masked(
    js: JetStreamContext, topology: Topology, key_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keychain = Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={}))
    token = "tok-" + secrets.token_hex(12)
    await keychain.set(Scope("acme", "web"), "api", token.encode())
    runner = await bound(js, topology, key_dir)
    configure_logging(level="info", fmt="json")
    try:
        tool = {"kind": "python", "call": "examples.tools.credentials:log_it", "credentials": {"api": "api"}}
        await runner(command(tool), attempt=1)
        structlog.get_logger("t").info("after", value=token)  # outside the call: not this mask's business
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if '"event": "tool.said"' in line or '"event":"tool.said"' in line]
    assert lines and token not in lines[0] and "***" in lines[0], err


@pytest.mark.parametrize(
    ("tool", "words"),
    [
        ({"kind": "http", "url": "http://127.0.0.1:9/", "auth": {"type": "bearer", "credential": "nope"}},
         "unknown credential 'nope' in acme/web"),
        ({"kind": "python", "call": "examples.tools.credentials:reveal", "credentials": {"api": "bonly"}},
         "unknown credential 'bonly' in acme/web"),
    ],
)
async def test_an_unknown_alias_or_another_tenants_alias_is_a_credential_error(
    js: JetStreamContext, topology: Topology, key_dir: Path, tool: dict[str, Any], words: str
) -> None:
    keychain = Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={}))
    await keychain.set(Scope("other", "web"), "bonly", b"b-secret-value")
    await keychain.set(Scope("acme", "other"), "bonly", b"b-secret-value")
    runner = await bound(js, topology, key_dir)
    with pytest.raises(ToolError) as info:
        await runner(command(tool), attempt=1)
    assert info.value.type == "credential" and words in info.value.message


async def test_a_worker_without_the_key_fails_the_step_not_itself(
    js: JetStreamContext, topology: Topology, key_dir: Path, tmp_path: Path
) -> None:
    await Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={})).set(Scope("acme", "web"), "api", b"value-123")
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    runner = await bound(js, topology, keyless)
    tool = {"kind": "python", "call": "examples.tools.credentials:reveal", "credentials": {"api": "api"}}
    with pytest.raises(ToolError) as info:
        await runner(command(tool), attempt=1)
    assert info.value.type == "credential" and "no keychain key" in info.value.message
    assert await runner(command({"kind": "noop", "result": 1}), attempt=1) == 1  # steps without credentials still run
    # With another platform key the value does not decrypt: a credential error too, never the value.
    other = tmp_path / "other"
    other.mkdir()
    PlatformKey.from_env(data_dir=other, env={}, create=True)
    with pytest.raises(ToolError) as info:
        await (await bound(js, topology, other))(command(tool), attempt=1)
    assert info.value.type == "credential" and "value-123" not in info.value.message


async def test_registering_checks_every_alias_in_the_playbooks_own_scope(
    js: JetStreamContext, key_dir: Path
) -> None:
    keychain = Keychain(js, PlatformKey.from_env(data_dir=key_dir, env={}))
    await keychain.set(Scope("acme", "web"), "api", b"v1")
    await keychain.set(Scope("beta", "web"), "bonly", b"v2")
    catalog = await Catalog.open(js)
    assert catalog.keychain is not None
    text = """
path: demo/creds
version: 1
steps:
  - {name: a, tool: {kind: noop}, next: [{step: b}]}
  - {name: b, tool: {kind: http, url: "http://127.0.0.1/", auth: {type: bearer, credential: api}}, next: [{step: c}]}
  - {name: c, tool: {kind: python, call: "examples.tools.credentials:reveal", credentials: {api: ALIAS}}}
"""
    with pytest.raises(UnknownCredential) as info:
        await catalog.add("acme", "web", text.replace("ALIAS", "bonly"), policy=POLICY)
    assert str(info.value).startswith("steps[2].tool.credentials.api: unknown credential 'bonly' in acme/web")
    with pytest.raises(UnknownCredential) as info:
        await catalog.add("beta", "web", text.replace("ALIAS", "bonly"), policy=POLICY)
    assert str(info.value).startswith("steps[1].tool.auth.credential: unknown credential 'api' in beta/web")
    assert await catalog.list("acme", "web") == [] and await catalog.list("beta", "web") == []
    kv = await js.key_value(CATALOG_BUCKET)
    assert (await js.stream_info("KV_" + kv._name)).state.messages == 0  # noqa: SLF001 - nothing written at all
    registered = await catalog.add("acme", "web", text.replace("ALIAS", "api"), policy=POLICY)
    assert registered.created and await catalog.list("acme", "web") == [("demo/creds", 1)]


async def test_a_worker_given_the_old_key_too_reads_through_a_platform_key_rotation(
    js: JetStreamContext, topology: Topology, tmp_path: Path, echo: str
) -> None:
    old, new = PlatformKey.generate(), PlatformKey.generate()
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    for key, path in ((old, old_file), (new, new_file)):
        path.write_text(base64.b64encode(key.key).decode())
    token = "tok-" + secrets.token_hex(12)
    await Keychain(js, old).set(Scope("acme", "web"), "api", token.encode())
    tool = {"kind": "http", "url": f"{echo}/", "auth": {"type": "bearer", "credential": "api"}}
    # Step 2 of the rotation: workers restarted with the new key and the old one as read-only.
    env = {"NOETL_KEYCHAIN_KEY_FILE": str(new_file), "NOETL_KEYCHAIN_OLD_KEY_FILES": str(old_file)}
    runner = ToolRunner(POLICY, data_dir=tmp_path, env=env)
    runner.bind(js, topology)
    out = await runner(command(tool), attempt=1)  # still wrapped under the old key
    assert isinstance(out, Reported) and SEEN[-1]["authorization"] == f"Bearer {token}"
    assert await Keychain(js, old).rewrap(new) == 1
    out = await runner(command(tool), attempt=1)  # now under the new one
    assert isinstance(out, Reported) and SEEN[-1]["authorization"] == f"Bearer {token}"
    # Without the old key, a worker on the new key alone could not have read it before the rewrap.
    alone = ToolRunner(POLICY, data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY_FILE": str(old_file)})
    alone.bind(js, topology)
    with pytest.raises(ToolError, match="wrapped under key"):
        await alone(command(tool), attempt=1)
