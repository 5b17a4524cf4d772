"""Running a benchmark script as a user does: its own interpreter, the repository as cwd, no NOETL_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python bench/<script> <args>``; stdout and stderr captured, the exit code left to the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, check=False)  # fmt: skip
