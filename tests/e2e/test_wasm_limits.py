"""The operator's WASM limits for user tools (``NOETL_WASM_FUEL``, ``NOETL_WASM_MEMORY``, ``NOETL_WASM_TIMEOUT``):
read by ``noetl-edge worker`` and ``up`` when they start, applied to every ``tool: wasm`` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from locator.envelope import Envelope
from tests import wasm_plugins
from tests.e2e.conftest import Proc, e2e_env, wait_for_wal
from tests.worker.test_worker import PROJECT, TENANT, issue, make_command
from tests.wasm_plugins import register_plugin

score_wasm = wasm_plugins.score_wasm  # the session fixture, for this module
TOOL = {"kind": "wasm", "plugin": "tools/score", "args": {"a": 2, "b": 40}}


def outcome(envs: list[Envelope]) -> bool:
    return any(e.type in ("step.exit", "call.error") for e in envs)


async def run_step(url: str, js: JetStreamContext, tmp_path: Path, execution_id: str, **env: str) -> Envelope:
    """One ``score`` command run by a ``noetl-edge worker`` process started with ``env``; its outcome event."""
    worker = Proc(["worker", "--nats-url", url, "--data-dir", str(tmp_path / "data")], env=e2e_env(**env), logs=tmp_path,
                  name=f"worker-{execution_id}")  # fmt: skip
    try:
        await issue(js, make_command(execution_id, "score", TOOL))
        events = await wait_for_wal(js, TENANT, PROJECT, execution_id, outcome, why=worker.logs)
    finally:
        assert worker.stop() == 0, worker.logs()
    return next(e.env for e in events if e.env.type in ("step.exit", "call.error"))


async def test_a_lowered_fuel_limit_turns_a_passing_step_into_wasm_fuel(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, score_wasm: Path
) -> None:
    record = await register_plugin(js, score_wasm, "tools/score", owner=f"{TENANT}/{PROJECT}")
    passed = await run_step(nats_server.url, js, tmp_path, "201")
    assert passed.type == "step.exit" and passed.payload["result"] == [{"sum": 42, "version": 1}]
    # The same step, the same module, a worker whose operator allows each call only 1000 units of fuel.
    starved = await run_step(nats_server.url, js, tmp_path, "202", NOETL_WASM_FUEL="1000")
    assert starved.type == "call.error", starved.payload
    error = starved.payload["error"]
    assert error["type"] == "wasm_fuel" and f"{TENANT}/{PROJECT}/tools/score@v{record.version}" in error["message"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NOETL_WASM_FUEL", "lots", "NOETL_WASM_FUEL must be an integer amount of fuel, got 'lots'"),
        ("NOETL_WASM_FUEL", "0", "NOETL_WASM_FUEL must be between 1 and 1000000000000000, got 0"),
        ("NOETL_WASM_MEMORY", "64k", "NOETL_WASM_MEMORY must be an integer number of bytes, got '64k'"),
        ("NOETL_WASM_MEMORY", "4096", "NOETL_WASM_MEMORY must be between 65536 and 4294967296, got 4096"),
        ("NOETL_WASM_TIMEOUT", "nan", "NOETL_WASM_TIMEOUT must be between 0.001 and 3600.0, got nan"),
        ("NOETL_WASM_TIMEOUT", "-1", "NOETL_WASM_TIMEOUT must be between 0.001 and 3600.0, got -1"),
    ],
)
def test_a_bad_limit_stops_worker_and_up_at_start(cli: Any, tmp_path: Path, name: str, value: str, message: str) -> None:
    env = e2e_env(**{name: value})
    # Checked before anything connects or starts: no server at this URL, no data directory is created.
    for args in (["worker", "--nats-url", "nats://127.0.0.1:1"], ["up"]):
        proc = cli(*args, "--data-dir", str(tmp_path / "data"), check=False, env=env)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.strip().splitlines() == [f"noetl-edge: error: {message}"]
    assert not (tmp_path / "data").exists()
