"""bench/steps.py: a quick run prints one JSON document of the documented shape (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.steps import breakdown
from bench.steps_profile import SEGMENTS, analyse

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "steps.py"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}


def _dist_keys(d: dict[str, object]) -> None:
    assert {"p50", "p99", "mean", "min", "max", "samples"} <= d.keys()
    assert all(isinstance(d[k], (int, float)) for k in ("p50", "p99", "mean", "min", "max", "samples"))


def test_help() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], check=False, capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--profile" in proc.stdout


@pytest.mark.slow
def test_quick_run_prints_the_documented_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], check=False, capture_output=True, text=True, timeout=240, env=_env(), cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON document, nothing else on stdout
    assert out["bench"] == "steps"
    _dist_keys(out["per_step_ms"])
    _dist_keys(out["execution_ms"])
    assert out["execution_ms"]["samples"] == out["settings"]["executions"]
    _dist_keys(out["floor"]["request_reply_ms"])
    _dist_keys(out["floor"]["js_publish_ack_ms"])
    assert isinstance(out["ratio_step_p50_to_rtt_p50"], (int, float))
    assert isinstance(out["meets_goal"], bool)
    cut = out["breakdown"]
    assert set(cut["segments_ms"]) == {"orchestrate", "enter_to_issued", "dispatch", "run"}
    assert cut["duplicate_commands"] == 0
    assert {"kernel", "workers", "nats_server", "client", "total"} == out["cpu_ms_per_step"].keys()
    assert {"kernel", "workers"} == out["nats_msgs_per_step"].keys() == out["throughput"]["nats_msgs_per_execution"].keys()
    assert {"sent", "received"} == out["nats_msgs_per_step"]["kernel"].keys()
    rates = out["throughput"]["executions_per_s"]
    assert len(rates["rounds"]) == out["settings"]["rounds"] and rates["median"] > 0
    assert out["settings"]["workers"] == 2 and out["settings"]["steps"] == 20
    assert out["machine"]["cpus"] >= 1 and "profile" not in out
    assert "[bench]" in proc.stderr  # progress goes to stderr


@pytest.mark.slow
def test_quick_profile_fills_every_segment() -> None:
    # The hooks must still fire where the code now sends, runs, confirms and acks: every segment has samples.
    # --no-inline: the worker's segments need steps that cross a worker (noop steps otherwise run inline).
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--profile", "--no-inline"],
        check=False, capture_output=True, text=True, timeout=240, env=_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    prof = out["profile"]
    steps = out["settings"]["executions"] * out["settings"]["steps"]
    assert prof["step_exits_matched"] == steps and prof["commands_matched"] >= steps
    assert isinstance(prof["orchestrator_republished"], int)
    assert set(prof["segments_ms"]) == set(SEGMENTS)
    for seg in prof["segments_ms"].values():
        assert {"p50", "p90", "mean", "what"} == seg.keys() and seg["p50"] >= 0
    assert prof["pumps"]["orchestrate_0"]["events"] >= steps


def test_profile_hooks_still_fit_the_code() -> None:
    # The hooks wrap private methods of the kernel and the worker: renaming one must fail here, not mid-benchmark.
    code = "from bench.steps_profile import install_kernel_hooks as k, install_worker_hooks as w; k(); w()"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _history(steps: int) -> list[tuple[int, int, str, str | None]]:
    """A synthetic WAL of one execution: each step takes 1 ms per event, 4 events per step."""
    out: list[tuple[int, int, str, str | None]] = [(1, 0, "execution.requested", None), (2, 1_000_000, "execution.started", None)]
    ns = 1_000_000
    for i in range(steps):
        for kind in ("step.enter", "command.issued", "command.claimed", "step.exit"):
            ns += 1_000_000
            out.append((len(out) + 1, ns, kind, f"s{i:02d}"))
    out.append((len(out) + 1, ns + 1_000_000, "execution.completed", None))
    return out


def test_breakdown_cuts_each_step() -> None:
    cut = breakdown([_history(3)], 3)
    seg = cut["segments_ms"]
    assert seg["orchestrate"]["p50"] == seg["enter_to_issued"]["p50"] == seg["dispatch"]["p50"] == seg["run"]["p50"] == 1.0
    assert cut["step_cycle_ms"]["p50"] == 4.0
    assert cut["wal_span_ms"]["p50"] == 14.0 and cut["duplicate_commands"] == 0
    twice = _history(2)
    twice.insert(4, (99, twice[3][1], "command.issued", "s00"))
    assert breakdown([twice], 2)["duplicate_commands"] == 1


def test_analyse_lines_up_records_with_the_wal() -> None:
    history = _history(1)
    exit_seq, exit_ns = history[-2][0], history[-2][1]
    ms = 1_000_000
    batch = {
        "consumer": "orchestrate_0", "asked": exit_ns - ms // 2, "fetched": exit_ns + ms, "msgs": [[exit_seq, exit_ns]],
        "dispatch": [exit_ns + ms, exit_ns + 8 * ms], "plan": [[exit_ns + ms, exit_ns + 2 * ms]],
        # _publish: two events and the command queued (1 ms in all), then their acks waited for (3 ms).
        "publish": [[exit_ns + 3 * ms, exit_ns + 7 * ms]],
        "send": [[exit_ns + 3 * ms, exit_ns + 3 * ms + ms // 2], [exit_ns + 3 * ms + ms // 2, exit_ns + 4 * ms]],
        "confirm": [[exit_ns + 4 * ms, exit_ns + 6 * ms], [exit_ns + 6 * ms, exit_ns + 7 * ms]],
        "republish": [[exit_ns + 6 * ms, exit_ns + 7 * ms]], "end": exit_ns + 9 * ms,
    }  # fmt: skip
    worker = {"execution_id": "x", "step": "s00", "cmd_stored": 0, "started": 2 * ms, "claim": [[2 * ms, 3 * ms]],
              "run": [[3 * ms, 5 * ms]], "outcome": [5 * ms, 8 * ms], "confirm": [[8 * ms, 9 * ms]], "end": 11 * ms}  # fmt: skip
    dead = {"execution_id": "x", "step": "s00", "cmd_stored": 0, "started": ms, "outcome": [ms, 2 * ms], "end": 3 * ms}
    other = worker | {"execution_id": "not measured"}
    out = analyse([batch], [worker, dead, other], {"x": history}, orchestrate_consumer="orchestrate_0", window=(0, 10**12))
    seg = out["segments_ms"]
    assert out["step_exits_matched"] == 1 and out["commands_matched"] == 1 and out["orchestrator_republished"] == 1
    assert seg["pump_busy"]["p50"] == 0.0 and seg["pump_delivery"]["p50"] == 1.0
    assert seg["publish"]["p50"] == 4.0 and seg["publish_send"]["p50"] == 1.0 and seg["publish_acks"]["p50"] == 3.0
    assert seg["state_and_plan"]["p50"] == 3.0 and seg["plan"]["p50"] == 1.0 and seg["pump_ack"]["p50"] == 1.0
    assert seg["cmd_delivery"]["p50"] == 2.0 and seg["claim_queued"]["p50"] == 1.0 and seg["run"]["p50"] == 2.0
    assert seg["outcome_publish"]["p50"] == 3.0 and seg["claim_confirm"]["p50"] == 1.0 and seg["worker_ack"]["p50"] == 2.0
    assert all(v["what"] for v in seg.values())
    assert out["pumps"]["orchestrate_0"]["batches"] == 1
