"""A real user plug-in for tests that need one registered: examples/wasm/score.c built with the ziglang wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import JetStreamContext

from worker.plugins import PluginRecord, PluginRegistry
from worker.toolchain import build
from worker.wasm import WasmHost

SCORE = Path(__file__).resolve().parents[1] / "examples" / "wasm" / "score.c"


@pytest.fixture(scope="session")
def score_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/wasm/score.c compiled once per test session (import this fixture into the test module)."""
    return build(SCORE, tmp_path_factory.mktemp("wasm") / "score.wasm")


async def register_plugin(js: JetStreamContext, wasm: Path, path: str, owner: str = "acme/web") -> PluginRecord:
    """Register ``wasm`` as ``owner``'s plug-in ``path`` through the real registry."""
    host = WasmHost()
    try:
        record, _ = await PluginRegistry(js, host).register(owner, path, wasm.read_bytes())
    finally:
        host.close()
    return record
