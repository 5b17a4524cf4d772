"""bench/replay.py: a quick run prints one JSON document of the documented shape (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess

from tests.bench.runner import run_bench


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_bench("replay.py", *args, timeout=timeout)


def _stats(d: object, rounds: int) -> None:
    assert isinstance(d, dict) and d.keys() == {"median", "best", "rounds"}
    values = d["rounds"]
    assert isinstance(values, list) and len(values) == rounds and all(isinstance(v, int) and v > 0 for v in values)
    assert d["best"] == max(values) and min(values) <= d["median"] <= max(values)


def test_quick_run_replays_every_published_event_and_prints_the_documented_json() -> None:
    proc = _run("--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON document, nothing else on stdout
    assert out["bench"] == "replay" and out["quick"] is True
    # The bench aborts unless the fold's event_count is the published count: a zero exit means it was.
    assert out["events"] == 2000 and out["rounds"] == 1 and out["warmup_rounds"] == 1
    assert out["other_events_on_shard"] == round(2000 * 0.1 / 0.9)  # the subject filter had traffic to skip
    for key in ("baseline_eps", "replay_eps", "timeline_eps"):
        _stats(out[key], 1)
    # The rates are rounded, the ratio is not.
    assert abs(out["ratio"] - out["replay_eps"]["median"] / out["baseline_eps"]["median"]) < 0.01
    assert out["goal"] == 0.5 and out["meets_goal"] is (out["ratio"] >= 0.5)
    assert out["ratio_timeline"] > 0 and out["ratio_paired_median"] > 0
    if out["cli_eps"] is None:
        assert out["ratio_cli"] is None and out["cli_skipped"]
    else:
        _stats(out["cli_eps"], 1)
        assert out["ratio_cli"] > 0 and out["cli_skipped"] is None
    assert set(out["cpu_us_per_event"]) == {"baseline", "replay", "timeline"}
    assert all(v > 0 for v in out["cpu_us_per_event"].values())
    assert len(out["loadavg_1m"]) == 2
    assert "unknown" not in out["versions"].values()
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_bad_arguments_are_refused() -> None:
    proc = _run("--events", "1", timeout=60)
    assert proc.returncode == 2 and "--events must be >= 2" in proc.stderr and proc.stdout == ""
