"""kernel.process: the collector settings every long-running process takes at start."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import ConfigError
from kernel.process import DEFAULT_GC_THRESHOLD, tune_gc
from tests.conftest import cli_env


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_the_default_collects_the_young_generation_every_50000_allocations_and_freezes_start_up(restored: None) -> None:
    gc.unfreeze()
    built = [object() for _ in range(10)]  # tracked objects alive before tuning: frozen by it
    assert tune_gc({}) == DEFAULT_GC_THRESHOLD == 50_000
    assert gc.get_threshold() == (50_000, 20, 100)
    assert gc.get_freeze_count() > 0 and built
    assert tune_gc({"NOETL_GC_THRESHOLD": "700"}) == 700 and gc.get_threshold()[0] == 700
    assert tune_gc({"NOETL_GC_THRESHOLD": "0"}) == 0 and gc.get_threshold()[0] == 0  # no automatic collection


@pytest.mark.parametrize("raw", ["fast", "1e4", "-1", " "])
def test_a_bad_threshold_is_refused_and_changes_nothing(restored: None, raw: str) -> None:
    before = gc.get_threshold()
    with pytest.raises(ConfigError, match="NOETL_GC_THRESHOLD must be"):
        tune_gc({"NOETL_GC_THRESHOLD": raw})
    assert gc.get_threshold() == before


def test_a_long_running_command_refuses_a_bad_threshold_with_one_line(cli: Any, tmp_path: Path) -> None:
    env = cli_env(NOETL_GC_THRESHOLD="lots", NOETL_DATA_DIR=str(tmp_path / "data"))
    proc = cli("up", "--nats-port", "0", check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["noetl-edge: error: NOETL_GC_THRESHOLD must be a whole number of allocations, got 'lots'"]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.blk"))  # no server was started
