"""bench/pipeline.py: a quick run prints one JSON document with every figure beside its baseline (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench.runner import run_bench


def _run(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return run_bench("pipeline.py", *args, timeout=timeout)


def _latency(stats: dict[str, float], samples: int | None = None) -> None:
    assert stats["samples"] > 0 and 0 < stats["best"] <= stats["p50"] <= stats["p99"] <= stats["max"]
    if samples is not None:
        assert stats["samples"] == samples


@pytest.mark.slow
def test_quick_run_prints_every_figure_beside_its_baseline(tmp_path: Path) -> None:
    out_file = tmp_path / "pipeline.json"
    proc = _run("--quick", "--json-out", str(out_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON document, nothing else on stdout
    assert json.loads(out_file.read_text()) == out
    assert out["bench"] == "pipeline" and out["quick"] is True
    assert len(out["loadavg_start"]) == 3 and len(out["loadavg_end"]) == 3 and out["machine"]["cores"] >= 1
    assert "unknown" not in out["versions"].values()

    sustained = out["sustained_ingest"]
    assert (sustained["events"], sustained["executions"], sustained["events_per_execution"]) == (2000, 200, 10)
    assert sustained["baseline_raw_publish"]["events_per_s"] > 0 and sustained["end_to_end"]["events_per_s"] > 0
    assert sustained["end_to_end"]["seconds"] >= sustained["wal_publish"]["seconds"]
    rates = sustained["end_to_end"]["events_per_s"] / sustained["baseline_raw_publish"]["events_per_s"]
    assert abs(sustained["ratio"] - rates) < 0.01  # the ratio of the two rates, not a figure of its own
    assert set(sustained["lag_at_publish_end"]) == set(sustained["caught_up_after_publish_s"]) == {
        "project", "materialize", "orchestrate",
    }  # fmt: skip
    assert sustained["goal_ratio"] == 0.8 and sustained["meets_goal"] is (sustained["ratio"] >= 0.8)

    orch = out["orchestration"]
    assert (orch["executions"], orch["steps_per_execution"]) == (40, 5)
    # Correctness is checked by the bench itself, on the WAL and through the edge: these are real counts.
    assert (orch["wrong"], orch["duplicate_commands"], orch["missing_commands"]) == (0, 0, 0)
    assert orch["executions_without_exactly_one_exit_per_step"] == 0
    assert orch["projections_checked"] == 10 and orch["projections_wrong"] == 0
    assert orch["steps_per_s"] > 0 and orch["goal_steps_per_s"] == 1500.0 and orch["start_retries"] >= 0

    edge = out["edge_under_load"]
    _latency(edge["idle_before"], 50)
    _latency(edge["idle_after"], 50)
    _latency(edge["idle"], 100)
    for name in ("during_http_ingest", "during_sustained_ingest", "during_orchestration"):
        _latency(edge[name])
        assert edge["p99_over_idle_p99"][name] > 0
        assert edge[name]["errors"] >= 0 and (edge[name]["first_error"] is None) is (edge[name]["errors"] == 0)
    assert edge["goal_p99_ms"] == 10.0

    http = out["http_ingest"]
    assert http["connections"] == 8 and http["rounds"] == 1
    for side in ("baseline_trivial_starlette", "edge_post_events"):
        assert http[side]["rps_median"] > 0 and 0 < http[side]["p50"] <= http[side]["p99"]
        assert len(http[side]["rps_rounds"]) == 1 and http[side]["errors"] >= 0
    assert (http["goal_ratio"], http["goal_p99_ms"]) == (0.5, 20.0)

    ingest = out["ingest"]
    assert ingest["baseline_publish_async_eps"]["median"] > 0 and ingest["producer_publish_many_eps"]["median"] > 0
    assert ingest["goal_ratio"] == 1.0 and ingest["meets_goal"] is (ingest["ratio_median"] >= 1.0)

    assert out["goals_met"] == {k: out[k]["meets_goal"] for k in (
        "sustained_ingest", "orchestration", "edge_under_load", "http_ingest", "ingest",
    )}  # fmt: skip
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_help_and_bad_arguments() -> None:
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--burst" in proc.stdout
    proc = _run("--events", "10", "--executions", "10", timeout=60)
    assert proc.returncode == 2 and "--events at least twice --executions" in proc.stderr and proc.stdout == ""
