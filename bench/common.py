"""What the benchmark scripts share: child processes, their CPU time, and the versions they report.

Imported as ``bench.common`` (each script puts the repository root on ``sys.path`` first).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from natscluster.natsbin import find_nats_server


def child_env() -> dict[str, str]:
    """This environment without ``NOETL_*``: a child starts from the defaults the bench sets."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}


class Proc:
    """A child process: stdout lines through a reader thread, stderr to a log file."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, *, stop_wait: float = 40.0, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.stop_wait = stop_wait
        self.log_path = log_dir / f"{name}.stderr"
        self._err = self.log_path.open("w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err, text=True, env={**child_env(), **(env or {})})
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def tail(self) -> str:
        self._err.flush()
        return self.log_path.read_text()[-3000:]

    def line(self, timeout: float = 30.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no output within {timeout}s; stderr:\n{self.tail()}") from None
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()}); stderr:\n{self.tail()}")
        return line.strip()

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); stderr:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (Linux /proc; 0.0 elsewhere)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_server_version() -> str:
    try:
        text = subprocess.run(
            [str(find_nats_server()), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return text.strip().rsplit(" ", 1)[-1].lstrip("v") or "unknown"


def dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def serve_until_signal(app: Any, bind: str) -> int:
    """Serve a baseline ``app`` on ``edge.serve.serve`` (the edge's Hypercorn config) until SIGINT/SIGTERM.

    Prints ``ready http://<bind>`` first; imported lazily, so a benchmark's own process never loads the server.
    """
    from edge.cli.options import stop_on_signals
    from edge.serve import install_uvloop, serve

    install_uvloop()  # as `noetl-edge edge` does

    async def main() -> None:
        stop = stop_on_signals()
        print(f"ready http://{bind}", flush=True)
        await serve(app, [bind], stop)

    asyncio.run(main())
    return 0
