"""Snowflake execution ids: 41 bits of milliseconds since 2026-01-01Z, 10 bits node, 12 bits sequence."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from datetime import datetime, timezone

from locator.errors import LocatorError

EPOCH_MS = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
MAX_SEQ = (1 << SEQ_BITS) - 1
MAX_MS = (1 << 41) - 1


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Snowflake:
    """Thread-safe, strictly monotonic id generator for one process.

    Ids are ints; :meth:`next_str` gives the decimal string used on the wire.
    When the clock stands still or steps back, ids keep increasing by borrowing
    from the next millisecond rather than blocking.

    >>> gen = Snowflake(node_id=7)
    >>> a, b = gen.next_id(), gen.next_id()
    >>> b > a and node_of(a) == 7
    True
    """

    def __init__(self, *, node_id: int | None = None) -> None:
        if node_id is None:
            node_id = default_node_id()
        if not 0 <= node_id <= MAX_NODE:
            raise LocatorError(f"node id must be between 0 and {MAX_NODE}, got {node_id}")
        self.node_id = node_id
        self._lock = threading.Lock()
        self._last_ms = -1
        self._seq = 0

    def next_id(self) -> int:
        with self._lock:
            ms = max(_wall_ms() - EPOCH_MS, self._last_ms)
            if ms == self._last_ms:
                self._seq += 1
                if self._seq > MAX_SEQ:
                    ms += 1
                    self._seq = 0
            else:
                self._seq = 0
            if ms > MAX_MS or ms < 0:
                raise LocatorError("the clock is outside the snowflake range (2026-01-01 .. +69 years)")
            self._last_ms = ms
            return (ms << (NODE_BITS + SEQ_BITS)) | (self.node_id << SEQ_BITS) | self._seq

    def next_str(self) -> str:
        return str(self.next_id())


def default_node_id() -> int:
    """``NOETL_NODE_ID`` if set, else a random node id (set it per process in a fleet)."""
    raw = os.environ.get("NOETL_NODE_ID")
    if raw is None or raw == "":
        return secrets.randbelow(MAX_NODE + 1)
    try:
        return int(raw)
    except ValueError as e:
        raise LocatorError(f"NOETL_NODE_ID must be an integer 0..{MAX_NODE}, got {raw!r}") from e


def timestamp_ms_of(snowflake: int) -> int:
    """Unix milliseconds encoded in a snowflake id."""
    return (snowflake >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS


def node_of(snowflake: int) -> int:
    return (snowflake >> SEQ_BITS) & MAX_NODE


def child_execution_id(
    parent_id: str, step: str, iteration: int | None, attempt: int, *, salt: int = 0
) -> str:
    """The id of the child execution one parent step attempt (one loop iteration) starts, as a decimal string.

    Derived, never drawn: a redelivered or re-planned step names the same child, so it is started
    once. The parent's 41 bits of milliseconds are kept (children sort beside their parent); the
    low 22 bits are a SHA-256 digest of ``(parent, step, iteration, attempt)``. ``salt`` lets a
    caller that sees two of its children collide (about one in four million per pair) derive
    another id, deterministically.

    >>> a = child_execution_id("123456789012345678", "fan", 3, 1)
    >>> a == child_execution_id("123456789012345678", "fan", 3, 1) != child_execution_id("123456789012345678", "fan", 4, 1)
    True
    >>> timestamp_ms_of(int(a)) == timestamp_ms_of(123456789012345678)
    True
    """
    parent = int(parent_id)
    if parent <= 0:
        raise LocatorError(f"a parent execution id must be a positive int64, got {parent_id!r}")
    key = f"{parent}:{step}:{'-' if iteration is None else iteration}:{attempt}:{salt}".encode()
    low = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << (NODE_BITS + SEQ_BITS)) - 1)
    child = (parent >> (NODE_BITS + SEQ_BITS)) << (NODE_BITS + SEQ_BITS) | low
    if child in (0, parent):
        return child_execution_id(parent_id, step, iteration, attempt, salt=salt + 1)
    return str(child)
