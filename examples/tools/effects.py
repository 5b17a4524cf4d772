"""A tool with an observable side effect, for the worker-crash tests."""

from __future__ import annotations

import os
import time


def append_line(path: str, text: str, delay: float = 0.0) -> str:
    """Sleep ``delay`` seconds, then append the line ``text`` to the file at ``path`` (durably); return ``text``.

    A worker killed during the sleep leaves the file untouched, so counting the
    lines shows how many runs completed.
    """
    time.sleep(delay)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    return text
