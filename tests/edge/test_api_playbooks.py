"""Playbook catalog routes through httpx's ASGI transport, and ``noetl-edge playbook`` as a subprocess,
both against a real nats-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from natscluster.server import EmbeddedServer
from locator.topology import default_topology
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.playbook import Policy
from tests import wasm_plugins
from tests.wasm_plugins import register_plugin

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "playbooks"
BAD = REPO / "tests" / "system_playbooks" / "orchestrate" / "bad"
ADMIN, WRITER, READER = "tok-pb-admin-1", "tok-pb-writer-2", "tok-pb-reader-3"
TOKENS = [
    TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN),
    TokenSpec(name="writer", role="write", tenants=("acme",), token=WRITER),
    TokenSpec(name="reader", role="read", tenants=("acme",), token=READER),
]
POLICY = Policy(python_allow=("examples.tools.",))
BASE = "/api/v1/tenants/acme/projects/web/playbooks"
YAML = {"Content-Type": "application/yaml"}

score_wasm = wasm_plugins.score_wasm  # the session fixture, for this module


def auth(token: str = WRITER, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def text(path: str = "demo/hello", version: int = 1, result: str = "hi") -> str:
    return f"path: {path}\nversion: {version}\nsteps:\n  - {{name: a, tool: {{kind: noop, result: {result}}}}}\n"


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["detail"]
    return body


def wasm_playbook(plugin: str, *, version: int | None = None, path: str = "demo/scored", pb_version: int = 1) -> str:
    pin = "" if version is None else f", version: {version}"
    return (f"path: {path}\nversion: {pb_version}\nsteps:\n  - {{name: a, tool: {{kind: noop}}, next: [{{step: b}}]}}\n"
            f"  - {{name: b, tool: {{kind: wasm, plugin: {plugin}{pin}}}}}\n")  # fmt: skip


async def kv_state(kv: KeyValue) -> dict[str, int]:
    try:
        keys = await kv.keys()
    except Exception:  # NoKeysError
        return {}
    return {k: (await kv.get(k)).revision or 0 for k in keys}


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=TOKENS,
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
        policy=POLICY,
    )
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
        yield c


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    return await js.key_value("catalog")


async def test_put_yaml_201_then_same_200_then_get_and_list(client: httpx.AsyncClient) -> None:
    resp = await client.put(f"{BASE}/demo/hello", content=text(), headers=auth(**YAML))
    assert resp.status_code == 201, resp.text
    out = resp.json()
    assert (out["path"], out["version"], out["created"]) == ("demo/hello", 1, True)
    assert out["playbook"]["steps"][0]["tool"] == {"kind": "noop", "result": "hi"}
    assert resp.headers["location"] == f"{BASE}/demo/hello?version=1"

    again = await client.put(f"{BASE}/demo/hello", content="# same\n" + text(), headers=auth(**YAML))
    assert again.status_code == 200 and again.json()["created"] is False

    got = await client.get(f"{BASE}/demo/hello", headers=auth(READER))
    assert got.status_code == 200 and got.json() == {k: out[k] for k in ("path", "version", "playbook")}
    assert (await client.get(f"{BASE}/demo/hello?version=1", headers=auth(READER))).json()["version"] == 1
    listed = await client.get(BASE, headers=auth(READER))
    assert listed.status_code == 200 and listed.json() == {"playbooks": [{"path": "demo/hello", "version": 1}]}


async def test_put_json_body(client: httpx.AsyncClient) -> None:
    doc = {"path": "demo/json", "version": 2, "steps": [{"name": "a", "tool": {"kind": "noop"}}]}
    resp = await client.put(f"{BASE}/demo/json", json=doc, headers=auth())
    assert resp.status_code == 201, resp.text
    assert (await client.get(f"{BASE}/demo/json", headers=auth(READER))).json()["version"] == 2


async def test_every_example_registers_with_the_edge_policy(client: httpx.AsyncClient, js: JetStreamContext, score_wasm: Path) -> None:
    await register_plugin(js, score_wasm, "tools/score")  # examples/playbooks/wasm_score.yaml runs it
    for path in sorted(EXAMPLES.glob("*.yaml")):
        pb_path = next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("path:"))
        resp = await client.put(f"{BASE}/{pb_path}", content=path.read_bytes(), headers=auth(**YAML))
        assert resp.status_code == 201, (path.name, resp.text)


async def test_conflicting_version_409_and_nothing_changed(client: httpx.AsyncClient, kv: KeyValue) -> None:
    assert (await client.put(f"{BASE}/demo/hello", content=text(result="one"), headers=auth(**YAML))).status_code == 201
    before = await kv_state(kv)
    body = problem(await client.put(f"{BASE}/demo/hello", content=text(result="two"), headers=auth(**YAML)), 409)
    assert "already registered" in body["detail"]
    assert await kv_state(kv) == before


@pytest.mark.parametrize(
    "name",
    [
        "unknown_tool", "bad_when", "missing_step", "cycle", "bad_retry", "typo_field",
        "step_typo_template", "step_typo_when", "step_typo_loop", "loop_var_outside",
    ],
)
async def test_invalid_playbook_422_names_the_path(client: httpx.AsyncClient, kv: KeyValue, name: str) -> None:
    source = (BAD / f"{name}.yaml").read_text()
    expect = source.splitlines()[0].removeprefix("# expect: ")
    pb_path = next(line.split(":", 1)[1].strip() for line in source.splitlines() if line.startswith("path:"))
    body = problem(await client.put(f"{BASE}/{pb_path}", content=source, headers=auth(**YAML)), 422)
    assert expect in body["detail"]
    assert body["field"] == expect.split(":")[0] and body["field"].startswith("steps[")
    assert await kv_state(kv) == {}


async def test_python_tool_outside_the_edge_policy_is_422(app: Starlette, client: httpx.AsyncClient) -> None:
    app.state.policy = Policy()
    source = next(p for p in sorted(EXAMPLES.glob("*.yaml")) if "kind: python" in p.read_text()).read_text()
    pb_path = next(line.split(":", 1)[1].strip() for line in source.splitlines() if line.startswith("path:"))
    body = problem(await client.put(f"{BASE}/{pb_path}", content=source, headers=auth(**YAML)), 422)
    assert body["field"].endswith(".tool.call")


async def test_wasm_step_needs_its_plugin_registered_422(
    client: httpx.AsyncClient, js: JetStreamContext, kv: KeyValue, score_wasm: Path
) -> None:
    body = problem(await client.put(f"{BASE}/demo/scored", content=wasm_playbook("tools/ghost"), headers=auth(**YAML)), 422)
    assert body["field"] == "steps[1].tool.plugin"
    assert "steps[1].tool.plugin: no plug-in tools/ghost registered for acme/web" in body["detail"]
    assert await kv_state(kv) == {}
    await register_plugin(js, score_wasm, "tools/ghost", owner="acme/other")  # another project's: still unknown here
    await register_plugin(js, score_wasm, "tools/score")
    before = await kv_state(kv)
    assert problem(await client.put(f"{BASE}/demo/scored", content=wasm_playbook("tools/ghost"), headers=auth(**YAML)), 422)
    pinned = wasm_playbook("tools/score", version=3)
    body = problem(await client.put(f"{BASE}/demo/scored", content=pinned, headers=auth(**YAML)), 422)
    assert body["field"] == "steps[1].tool.version" and "plug-in tools/score has no version 3" in body["detail"]
    assert await kv_state(kv) == before
    for pb_version, pin in ((1, 1), (2, None)):
        ok = wasm_playbook("tools/score", version=pin, pb_version=pb_version)
        assert (await client.put(f"{BASE}/demo/scored", content=ok, headers=auth(**YAML))).status_code == 201


async def test_url_path_must_match_the_playbook(client: httpx.AsyncClient, kv: KeyValue) -> None:
    body = problem(await client.put(f"{BASE}/demo/other", content=text(), headers=auth(**YAML)), 422)
    assert body["field"] == "path" and "disagrees with the URL" in body["detail"]
    assert await kv_state(kv) == {}


async def test_bad_bodies(client: httpx.AsyncClient) -> None:
    problem(await client.put(f"{BASE}/demo/hello", content=b"", headers=auth(**YAML)), 400)
    problem(await client.put(f"{BASE}/demo/hello", content=b"{not json", headers=auth()), 400)
    assert problem(await client.put(f"{BASE}/demo/hello", json=[1], headers=auth()), 422)["field"] == ""
    problem(await client.put(f"{BASE}/demo/hello", content=b"x" * (2 * 1024 * 1024), headers=auth(**YAML)), 413)


async def test_unknown_playbook_and_version_404(client: httpx.AsyncClient) -> None:
    problem(await client.get(f"{BASE}/demo/nothing", headers=auth(READER)), 404)
    await client.put(f"{BASE}/demo/hello", content=text(), headers=auth(**YAML))
    problem(await client.get(f"{BASE}/demo/hello?version=9", headers=auth(READER)), 404)
    problem(await client.get(f"{BASE}/Demo/../x", headers=auth(READER)), 404)
    assert problem(await client.get(f"{BASE}/demo/hello?version=x", headers=auth(READER)), 422)["field"] == "version"
    assert (await client.get(BASE.replace("web", "api"), headers=auth(READER))).json() == {"playbooks": []}


async def test_auth(client: httpx.AsyncClient, kv: KeyValue) -> None:
    problem(await client.put(f"{BASE}/demo/hello", content=text(), headers=auth(READER, **YAML)), 403)
    problem(await client.put(f"{BASE}/demo/hello", content=text(), headers=YAML), 401)
    problem(await client.get(BASE, headers={}), 401)
    other = "/api/v1/tenants/other/projects/web/playbooks"
    problem(await client.put(f"{other}/demo/hello", content=text(), headers=auth(WRITER, **YAML)), 403)
    problem(await client.get(other, headers=auth(READER)), 403)
    assert await kv_state(kv) == {}
    assert (await client.put(f"{other}/demo/hello", content=text(), headers=auth(ADMIN, **YAML))).status_code == 201


async def test_latest_stays_highest_over_http(client: httpx.AsyncClient) -> None:
    for v in (2, 1):
        resp = await client.put(f"{BASE}/demo/hello", content=text(version=v), headers=auth(**YAML))
        assert resp.status_code == 201
    assert (await client.get(f"{BASE}/demo/hello", headers=auth(READER))).json()["version"] == 2
    assert (await client.get(BASE, headers=auth(READER))).json()["playbooks"] == [
        {"path": "demo/hello", "version": 1}, {"path": "demo/hello", "version": 2}
    ]


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_register_list_show(nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, tmp_path: Path) -> None:
    where = ["--tenant", "acme", "--project", "web", "--nats-url", nats_server.url]
    linear = str(EXAMPLES / "linear.yaml")
    out = json.loads(cli("playbook", "register", linear, *where).stdout)
    assert (out["path"], out["version"], out["created"]) == ("examples/linear", 1, True)
    assert json.loads(cli("playbook", "register", linear, *where).stdout)["created"] is False
    assert json.loads(cli("playbook", "list", *where).stdout) == {"playbooks": [{"path": "examples/linear", "version": 1}]}
    shown = json.loads(cli("playbook", "show", "examples/linear", *where).stdout)
    assert shown["version"] == 1 and [s["name"] for s in shown["playbook"]["steps"]] == ["first", "second", "third"]
    assert json.loads(cli("playbook", "show", "examples/linear", "--version", "1", *where).stdout) == shown

    missing = cli("playbook", "show", "examples/linear", "--version", "5", *where, check=False)
    assert missing.returncode == 1 and "no version 5" in missing.stderr

    changed = tmp_path / "linear.yaml"
    changed.write_text((EXAMPLES / "linear.yaml").read_text().replace('result: "first"', 'result: "other"'))
    conflict = cli("playbook", "register", str(changed), *where, check=False)
    assert conflict.returncode == 1 and "already registered" in conflict.stderr


@pytest.mark.parametrize(("name", "where_in_file"), [("unknown_tool", "steps[1].tool.kind"), ("cycle", "steps[2].next[0].step")])
def test_cli_register_bad_file_exits_2_and_writes_nothing(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, name: str, where_in_file: str
) -> None:
    where = ["--tenant", "acme", "--project", "web", "--nats-url", nats_server.url]
    proc = cli("playbook", "register", str(BAD / f"{name}.yaml"), *where, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and where_in_file in lines[0] and f"{name}.yaml" in lines[0]
    assert json.loads(cli("playbook", "list", *where).stdout) == {"playbooks": []}


async def test_cli_register_and_run_refuse_a_misspelt_step_name(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, count_wal: Any
) -> None:
    where = ["--tenant", "acme", "--project", "web", "--nats-url", nats_server.url]
    for command in (["playbook", "register"], ["run"]):
        proc = cli(*command, str(BAD / "step_typo_template.yaml"), *where, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(
            "step_typo_template.yaml: steps[1].tool.result: unknown step 'frist' (did you mean 'first'?) at column 4"
        ), lines
    assert json.loads(cli("playbook", "list", *where).stdout) == {"playbooks": []}
    assert await count_wal(js, 4) == [0, 0, 0, 0]


def test_cli_register_python_tool_needs_the_policy(nats_server: EmbeddedServer, js: JetStreamContext, cli: Any) -> None:
    from tests.conftest import cli_env

    where = ["--tenant", "acme", "--project", "web", "--nats-url", nats_server.url]
    example = next(p for p in sorted(EXAMPLES.glob("*.yaml")) if "kind: python" in p.read_text())
    refused = cli("playbook", "register", str(example), *where, check=False)
    assert refused.returncode == 2 and ".tool.call" in refused.stderr
    assert cli("playbook", "register", str(example), *where, env=cli_env(NOETL_PYTHON_ALLOW="examples.tools.")).returncode == 0
    assert cli("playbook", "register", str(example), *where, "--python-allow", "examples.tools.").returncode == 0


async def test_cli_register_and_run_refuse_an_unregistered_plugin(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, tmp_path: Path, score_wasm: Path, count_wal: Any
) -> None:
    where = ["--tenant", "acme", "--project", "web", "--nats-url", nats_server.url]
    file = tmp_path / "scored.yaml"
    file.write_text(wasm_playbook("tools/score"))
    for command in (["playbook", "register"], ["run"]):
        proc = cli(*command, str(file), *where, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "scored.yaml: steps[1].tool.plugin: no plug-in tools/score registered for acme/web" in lines[0]
    assert json.loads(cli("playbook", "list", *where).stdout) == {"playbooks": []}
    assert await count_wal(js, 4) == [0, 0, 0, 0]
    cli("plugin", "register", str(score_wasm), "--path", "tools/score", *where)
    out = json.loads(cli("playbook", "register", str(file), *where).stdout)
    assert (out["path"], out["version"], out["created"]) == ("demo/scored", 1, True)


def test_cli_bad_tenant_exits_2(cli: Any) -> None:
    proc = cli("playbook", "list", "--tenant", "Acme", "--project", "web", check=False)
    assert proc.returncode == 2 and "invalid tenant" in proc.stderr
