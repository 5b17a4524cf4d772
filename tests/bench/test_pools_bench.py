"""bench/pools.py: a quick run checks the pool gauges against what it stored and prints the documented JSON
(timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_both_phases_and_their_ratio() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pools.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a wrong pool count aborts the run
    out = json.loads(proc.stdout)
    assert out["bench"] == "pools" and out["quick"] is True
    assert (out["pools"], out["commands_per_pool"], out["rounds"], out["shards"]) == (2, 3, 1, 4)
    for key in ("baseline_scrapes_per_s", "pools_scrapes_per_s"):
        assert out[key].keys() == {"median", "best", "rounds"} and len(out[key]["rounds"]) == 1
    assert abs(out["ratio"] - out["pools_scrapes_per_s"]["median"] / out["baseline_scrapes_per_s"]["median"]) < 0.05
    assert len(out["load_average"]["start"]) == 3 and len(out["load_average"]["end"]) == 3
