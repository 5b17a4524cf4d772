"""bench/wasm.py: a quick run prints one JSON document of the documented shape (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "wasm.py"


def _stats(d: dict[str, object], rounds: int, *, rate: bool = False) -> None:
    assert {"median", "best", "rounds"} == d.keys()
    values = d["rounds"]
    assert isinstance(values, list) and len(values) == rounds and all(isinstance(v, (int, float)) and v > 0 for v in values)
    assert d["best"] == (max(values) if rate else min(values))  # the highest rate, the lowest time
    assert min(values) <= d["median"] <= max(values)  # type: ignore[operator]


def test_quick_run_prints_the_documented_json() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON document, nothing else on stdout
    assert out["bench"] == "wasm" and out["settings"]["quick"] is True
    rounds = out["settings"]["rounds"]
    trip = out["roundtrip"]
    for key in ("warm_us", "bare_call_us", "python_us", "invoke_us"):
        _stats(trip[key], rounds)
    assert trip["ratio_warm_to_python"] > 0 and trip["ratio_invoke_to_python"] > 0 and trip["invoke_fuel"] > 0
    inst = out["instantiate"]
    _stats(inst["instantiate_us"], rounds)
    _stats(inst["compile_ms"], rounds)
    assert inst["module_bytes"] > 1000 and inst["ratio_compile_to_instantiate"] > 0
    rows = out["row_builder"]
    _stats(rows["python_eps"], rounds, rate=True)
    _stats(rows["wasm_eps"], rounds, rate=True)
    assert rows["events"] == out["settings"]["events"] and rows["rows"] == out["settings"]["executions"]
    assert rows["identical"] is True and rows["ratio_wasm_to_python"] > 0 and rows["input_bytes"] > 0
    assert {"python", "wasmtime", "ziglang", "pyarrow"} == out["versions"].keys()
    assert "unknown" not in out["versions"].values()
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_bad_arguments_are_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--events", "5", "--executions", "9"], check=False, capture_output=True,
                          text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "--executions <= --events" in proc.stderr and proc.stdout == ""
