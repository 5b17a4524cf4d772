from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locator import LocatorError, Snowflake
from locator import ids as ids_module
from locator.ids import EPOCH_MS, MAX_SEQ, node_of, timestamp_ms_of


@given(node=st.integers(0, 1023), n=st.integers(1, 5000))
@settings(max_examples=30, deadline=None)
def test_monotonic_and_unique(node: int, n: int) -> None:
    gen = Snowflake(node_id=node)
    out = [gen.next_id() for _ in range(n)]
    assert out == sorted(out) and len(set(out)) == n
    assert all(node_of(i) == node for i in out)


def test_layout_and_epoch() -> None:
    before = time.time_ns() // 1_000_000
    value = Snowflake(node_id=5).next_id()
    after = time.time_ns() // 1_000_000
    assert before <= timestamp_ms_of(value) <= after
    assert value < 2**63 and timestamp_ms_of(0) == EPOCH_MS


def test_clock_standing_still_or_stepping_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [EPOCH_MS + 1_000_000]
    monkeypatch.setattr(ids_module, "_wall_ms", lambda: now[0])
    gen = Snowflake(node_id=1)
    first = [gen.next_id() for _ in range(MAX_SEQ + 10)]  # overflows the sequence within one millisecond
    now[0] -= 500  # the clock steps back
    later = [gen.next_id() for _ in range(10)]
    seq = first + later
    assert seq == sorted(seq) and len(set(seq)) == len(seq)


def test_thread_safety() -> None:
    gen = Snowflake(node_id=3)
    out: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [gen.next_id() for _ in range(5000)]
        assert mine == sorted(mine)
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 20000


@pytest.mark.parametrize("node", [-1, 1024])
def test_bad_node_id(node: int) -> None:
    with pytest.raises(LocatorError, match="node id"):
        Snowflake(node_id=node)


def test_node_id_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOETL_NODE_ID", "77")
    assert Snowflake().node_id == 77
    monkeypatch.setenv("NOETL_NODE_ID", "x")
    with pytest.raises(LocatorError, match="NOETL_NODE_ID"):
        Snowflake()
