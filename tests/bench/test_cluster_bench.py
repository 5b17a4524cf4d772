"""bench/cluster.py: a quick run prints one JSON document of the documented shape (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "cluster.py"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}


def test_bad_arguments_are_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--events", "3"], capture_output=True, text=True, timeout=60,
                          env=_env(), check=False)  # fmt: skip
    assert proc.returncode == 2 and "--events must be at least" in proc.stderr


@pytest.mark.slow
def test_quick_run_prints_the_documented_json() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=280,
                          env=_env(), cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["bench"] == "cluster" and result["events"] == 2000 and result["rounds"] == 1
    for deployment in ("r1", "r3"):
        for phase in ("publish", "fold"):
            figures = result[deployment][phase]
            assert set(figures) == {"median", "best", "rounds"} and len(figures["rounds"]) == 1
            assert figures["median"] > 0
    assert set(result["ratio_r3_over_r1"]) == {"publish", "fold"}
    assert result["versions"]["nats_server"] != "unknown"
