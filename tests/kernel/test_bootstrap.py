from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from kernel.bootstrap import SHARD_COUNT_KEY, StreamSettings, bootstrap, check_topology
from kernel.errors import BootstrapMismatch, KernelError, TopologyMismatch
from locator.topology import Topology, default_topology

EXPECTED = {"KV_catalog", "KV_leases", "OBJ_plugins", "KV_keychain", "KV_schedules", "KV_idempotency"} | {
    f"{kind}_{n}" for n in range(4) for kind in ("WAL", "CMD", "DLQ", "KV_proj", "KV_hist", "KV_vis")
}


async def test_bootstrap_creates_everything_then_changes_nothing(nc: NATS, topology: Topology) -> None:
    js = nc.jetstream()
    first = await bootstrap(js, topology)
    assert set(first.created) == EXPECTED and first.unchanged == []
    before = {s.config.name: (s.created, s.config) for s in await js.streams_info()}
    second = await bootstrap(js, topology)
    assert second.created == [] and set(second.unchanged) == EXPECTED
    after = {s.config.name: (s.created, s.config) for s in await js.streams_info()}
    assert before == after

    wal = await js.stream_info("WAL_2")
    assert wal.config.subjects == ["wal.2.>"] and wal.config.duplicate_window == 120
    assert wal.config.max_msg_size == 256 * 1024 and wal.config.storage == StorageType.FILE
    assert (await js.stream_info("CMD_2")).config.retention == "workqueue"
    assert (await js.stream_info("KV_leases")).config.max_age == 5
    assert (await js.stream_info("KV_idempotency")).config.max_age == 86400  # NOETL_IDEMPOTENCY_WINDOW's default


async def test_mismatch_is_reported_and_nothing_is_created(nc: NATS, topology: Topology) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="WAL_0", subjects=["wal.0.>"], max_msg_size=1024, storage=StorageType.FILE))
    with pytest.raises(BootstrapMismatch) as e:
        await bootstrap(js, topology)
    assert "WAL_0.max_msg_size is 1024, topology wants 262144" in e.value.problems
    assert all(p.startswith("WAL_0.") for p in e.value.problems)
    with pytest.raises(NotFoundError):
        await js.stream_info("CMD_0")
    assert (await js.stream_info("WAL_0")).config.max_msg_size == 1024


async def test_only_requested_shards(nc: NATS, topology: Topology) -> None:
    js = nc.jetstream()
    report = await bootstrap(js, topology, shards=[1])
    assert {s for s in report.created if s[-1].isdigit()} == {"WAL_1", "CMD_1", "DLQ_1", "KV_proj_1", "KV_hist_1", "KV_vis_1"}


def test_settings_from_env() -> None:
    s = StreamSettings.from_env({"NOETL_DUPLICATE_WINDOW": "300", "NOETL_MAX_MSG_SIZE": "4096"})
    assert s.duplicate_window_s == 300 and s.max_msg_size == 4096 and s.lease_ttl_s == 5
    with pytest.raises(KernelError, match="at least 120"):
        StreamSettings.from_env({"NOETL_DUPLICATE_WINDOW": "10"})
    with pytest.raises(KernelError, match="bad stream setting"):
        StreamSettings.from_env({"NOETL_MAX_MSG_SIZE": "big"})


async def test_shard_count_is_recorded_and_checked(nc: NATS, topology: Topology) -> None:
    js = nc.jetstream()
    with pytest.raises(TopologyMismatch, match="does not exist"):
        await check_topology(js, topology)
    await bootstrap(js, topology)
    await check_topology(js, topology)
    assert (await js.stream_info("WAL_0")).config.metadata[SHARD_COUNT_KEY] == "4"
    other = default_topology(shard_count=8)
    with pytest.raises(TopologyMismatch, match="bootstrapped for 4 shards, this client uses 8"):
        await check_topology(js, other)
    with pytest.raises(BootstrapMismatch, match="WAL_0.metadata"):
        await bootstrap(js, other)
