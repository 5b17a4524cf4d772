"""A tool with an observable side effect, for the worker-crash and cancellation tests."""

from __future__ import annotations

import os
import time


def append_line(path: str, text: str, delay: float = 0.0, gate: str | None = None, gate_timeout: float = 120.0) -> str:
    """Sleep ``delay`` seconds (and, with a ``gate``, wait until that file exists), then append the line
    ``text`` to the file at ``path`` (durably); return ``text``.

    A worker killed during the wait leaves the file untouched, so counting the
    lines shows how many runs completed. A test holds the step in flight for as
    long as it needs by creating the gate file only when it is ready.
    """
    time.sleep(delay)
    if gate is not None:
        deadline = time.monotonic() + gate_timeout
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} did not open within {gate_timeout:g}s")
            time.sleep(0.02)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    return text
