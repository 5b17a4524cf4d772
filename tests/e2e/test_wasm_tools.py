"""User ``tool: wasm`` steps end to end: ``noetl-edge plugin build|register``, a real ``noetl-edge up`` running them
under the user ring, hot reload without a restart, and misbehaving modules becoming ``call.error`` while the
kernel goes on folding other executions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
from nats.js import JetStreamContext

from tests.conftest import cli_env, cli_path
from tests.e2e.conftest import (
    EXAMPLES,
    REPO,
    Stack,
    check_invariant,
    ended,
    has,
    wait_for_wal,
)

SCORE = REPO / "examples" / "wasm" / "score.c"
PROBE = REPO / "tests" / "worker" / "wasm" / "probe.c"
TENANT = "wasm"


def plugin_build(*args: str) -> subprocess.CompletedProcess[str]:
    """``noetl-edge plugin build ARGS`` (it needs no NATS)."""
    return subprocess.run([cli_path(), "plugin", "build", *args], check=False, capture_output=True, text=True, env=cli_env(), timeout=120)


def build(stack: Stack, src: Path, out: Path, *defines: str) -> Path:
    proc = plugin_build(str(src), "-o", str(out), *(f"-D{d}" for d in defines))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["wasm"] == str(out)
    return out


def register(stack: Stack, wasm: Path, project: str, path: str) -> dict[str, object]:
    proc = stack.cli("plugin", "register", str(wasm), "--tenant", TENANT, "--project", project, "--path", path)
    record: dict[str, object] = json.loads(proc.stdout)
    return record


def playbook(tmp: Path, name: str, plugin: str) -> Path:
    file = tmp / f"{name}.yaml"
    file.write_text(f"path: wasm/{name}\nversion: 1\nsteps:\n  - name: go\n    tool: {{kind: wasm, plugin: {plugin}}}\n")
    return file


async def test_score_runs_then_hot_reloads_to_version_2(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, tmp_path: Path
) -> None:
    v1 = register(stack, build(stack, SCORE, tmp_path / "v1.wasm", "VERSION=1"), "score", "tools/score")
    assert v1["version"] == 1 and v1["created"] is True
    first = stack.run(EXAMPLES / "wasm_score.yaml", TENANT, "score")
    assert first.returncode == 0, first.stderr
    served = await check_invariant(stack_js, edge, TENANT, "score", first.execution_id)
    assert served.steps["score"].result == [{"sum": 42, "version": 1}]

    v2 = register(stack, build(stack, SCORE, tmp_path / "v2.wasm", "VERSION=2"), "score", "tools/score")
    assert v2["version"] == 2 and v2["digest"] != v1["digest"]
    second = stack.run(EXAMPLES / "wasm_score.yaml", TENANT, "score")  # the same `up` process: no restart
    assert second.returncode == 0, second.stderr
    served = await check_invariant(stack_js, edge, TENANT, "score", second.execution_id)
    assert served.steps["score"].result == [{"sum": 42, "version": 2}]

    # The WAL records which version ran, and the module's user event was published for its own execution.
    for run, record in ((first, v1), (second, v2)):
        events = await wait_for_wal(stack_js, TENANT, "score", run.execution_id, has("user.scored"))
        exit_event = next(e.env for e in events if e.env.type == "step.exit")
        assert exit_event.payload["plugin"] == {"path": "tools/score", "version": record["version"], "digest": record["digest"]}
        scored = next(e.env for e in events if e.env.type == "user.scored")
        assert scored.payload == {"sum": 42} and scored.step == "score"

    shown = json.loads(stack.cli("plugin", "show", "tools/score", "--tenant", TENANT, "--project", "score").stdout)
    assert shown["version"] == 2 and shown["active"] is True
    listed = json.loads(stack.cli("plugin", "list", "--tenant", TENANT, "--project", "score").stdout)
    assert [(p["path"], p["version"]) for p in listed["plugins"]] == [("tools/score", 1), ("tools/score", 2)]


async def test_trap_loop_and_memory_bomb_are_call_errors_while_others_complete(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, tmp_path: Path
) -> None:
    project = "isolation"
    register(stack, build(stack, SCORE, tmp_path / "score.wasm"), project, "tools/score")
    bad = {"trap": ("t", "wasm_trap"), "loop": ("l", "wasm_fuel"), "bomb": ("m", "wasm_memory"),
           "doubling": ("M", "wasm_memory")}  # refused at about half the 64 MiB limit, then a trap  # fmt: skip
    for name, (action, _) in bad.items():
        wasm = build(stack, PROBE, tmp_path / f"{name}.wasm", "PURE", f"ALWAYS='{action}'")
        register(stack, wasm, project, f"tools/{name}")
    started = {name: stack.run(playbook(tmp_path, name, f"tools/{name}"), TENANT, project, wait=False) for name in bad}
    good = [stack.run(EXAMPLES / "wasm_score.yaml", TENANT, project, wait=False) for _ in range(3)]

    for name, (_, kind) in bad.items():
        events = await wait_for_wal(stack_js, TENANT, project, started[name].execution_id, ended, timeout=90)
        error = next(e.env for e in events if e.env.type == "call.error")
        assert error.payload["error"]["type"] == kind, error.payload
        assert f"{TENANT}/{project}/tools/{name}@v1" in error.payload["error"]["message"]
        served = await check_invariant(stack_js, edge, TENANT, project, started[name].execution_id)
        assert served.status == "FAILED" and served.steps["go"].status == "FAILED"
    for run in good:
        await wait_for_wal(stack_js, TENANT, project, run.execution_id, ended, timeout=90)
        served = await check_invariant(stack_js, edge, TENANT, project, run.execution_id)
        assert served.status == "COMPLETED" and served.steps["score"].result == [{"sum": 42, "version": 1}]
    assert stack.proc.alive()


async def test_unknown_plugin_and_bad_builds(stack: Stack, stack_js: JetStreamContext, tmp_path: Path) -> None:
    # A playbook naming a plug-in the project has not registered is refused when `run` registers it.
    ghost = playbook(tmp_path, "ghost", "tools/ghost")
    proc = stack.cli("run", str(ghost), "--tenant", TENANT, "--project", "ghost", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "ghost.yaml: steps[0].tool.plugin: no plug-in tools/ghost registered for wasm/ghost" in proc.stderr
    broken = tmp_path / "broken.c"
    broken.write_text("long long run(int p, int n) { return p +; }\n")
    proc = plugin_build(str(broken))
    assert proc.returncode == 2 and "noetl-edge: error: compiling" in proc.stderr and "expected expression" in proc.stderr
    proc = stack.cli("plugin", "register", str(broken), "--tenant", TENANT, "--project", "x", "--path", "p", check=False)
    assert proc.returncode == 2 and "not a valid WASM module" in proc.stderr
    proc = stack.cli("plugin", "show", "tools/ghost", "--tenant", TENANT, "--project", "x", check=False)
    assert proc.returncode == 1 and "no plug-in tools/ghost registered for wasm/x" in proc.stderr
