"""bench/duckdb_step.py: a quick run checks both phases' answers on every run and prints the documented JSON
(timings are never asserted)."""

from __future__ import annotations

import json
import subprocess

from tests.bench.runner import run_bench


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_bench("duckdb_step.py", *args)


def test_quick_run_prints_both_phases_and_their_ratio() -> None:
    proc = run("--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]  # a wrong answer in either phase aborts the run
    out = json.loads(proc.stdout)
    assert (out["rows"], out["runs"], out["rounds"]) == (2000, 2, 2)
    assert out["stored_bytes"] > 0 and out["json_bytes"] > out["stored_bytes"]
    for phase in ("baseline", "duckdb"):
        assert out[phase]["per_s_best"] >= out[phase]["per_s_median"] > 0
    assert abs(out["ratio_duckdb_over_baseline"] - out["duckdb"]["per_s_median"] / out["baseline"]["per_s_median"]) < 1e-9
    assert len(out["loadavg_start"]) == 3 and len(out["loadavg_end"]) == 3


def test_bad_arguments_are_refused() -> None:
    proc = run("--runs", "0")
    assert proc.returncode == 2 and "--runs must be at least 1" in proc.stderr
