"""``noetl-edge up --kernels N``: N kernel processes share the shards through their leases."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from pathlib import Path

import nats
import pytest

from kernel.leases import lease_holder
from locator.subjects import LEASES_BUCKET
from tests.conftest import cli_env
from tests.edge.test_serve import Proc, client_for, procs, start_up  # noqa: F401 (procs: a fixture)
from tests.edge.test_up_edge_process import _children, _gone

SHARDS = 4


def _kernel_children(up: Proc) -> list[int]:
    return [pid for pid, cmd in _children(up.proc.pid).items() if "edge.cli.upkernel" in cmd]


async def _holders(nats_url: str, timeout: float = 60.0) -> dict[int, str]:
    """Shard → lease holder, once every shard is held and the holders' shares are even."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(LEASES_BUCKET)
        deadline = time.monotonic() + timeout
        while True:
            held = {shard: await lease_holder(kv, shard) for shard in range(SHARDS)}
            holders = {shard: v.holder for shard, v in held.items() if v is not None}
            counts = sorted(list(holders.values()).count(h) for h in set(holders.values()))
            if len(holders) == SHARDS and counts == [SHARDS // 2, SHARDS // 2]:
                return holders
            assert time.monotonic() < deadline, f"shards not shared evenly by two kernels: {holders}"
            await asyncio.sleep(0.3)
    finally:
        await nc.close()


@pytest.mark.slow
async def test_two_kernels_share_the_shards_and_fold_each_others(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path, "--kernels", "2")
    children = _kernel_children(up.proc)
    assert len(children) == 1, _children(up.proc.proc.pid)
    holders = await _holders(up.nats_url)
    assert any(h.endswith("-k2") for h in holders.values()), holders  # the child holds its half
    # An execution on every shard is folded into KV, whichever kernel holds the shard.
    async with client_for(up.http, up.token) as client:
        urls = []
        for project in ("ab", "aa", "ad", "ac"):  # shards 0, 1, 2, 3 of tenant acme with 4 shards
            r = await client.post(f"/api/v1/tenants/acme/projects/{project}/executions", json={"workload": {"p": project}})
            assert r.status_code == 202, r.text
            urls.append(r.headers["location"])
        deadline = time.monotonic() + 60
        for url in urls:
            while (r := await client.get(url)).headers.get("x-noetl-source") != "cache":
                assert r.status_code == 200, r.text
                assert time.monotonic() < deadline, f"{url} never folded into KV: {r.headers}"
                await asyncio.sleep(0.2)
    assert up.proc.terminate() == 0
    assert _gone(children[0]), "a kernel child outlived up's clean stop"


@pytest.mark.slow
def test_a_killed_up_takes_its_kernels_along(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path, "--kernels", "3")
    children = _kernel_children(up.proc)
    assert len(children) == 2, _children(up.proc.proc.pid)
    os.kill(up.proc.proc.pid, signal.SIGKILL)
    up.proc.proc.wait(timeout=30)
    assert all(_gone(pid) for pid in children), "a kernel child outlived a SIGKILLed up"


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--kernels", "0"], {}, "noetl-edge: error: --kernels must be between 1 and the shard count (4), got 0"),
        (["--kernels", "5"], {}, "noetl-edge: error: --kernels must be between 1 and the shard count (4), got 5"),
        ([], {"NOETL_UP_KERNELS": "9"}, "noetl-edge: error: --kernels must be between 1 and the shard count (4), got 9"),
    ],
)
def test_a_bad_kernel_count_stops_up_before_anything_starts(
    tmp_path: Path, procs: list[Proc], args: list[str], env: dict[str, str], line: str
) -> None:
    data = tmp_path / "data"
    up = Proc(["up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0", *args],
              log=tmp_path / "up.stderr", env={**cli_env(), **env})  # fmt: skip
    procs.append(up)
    assert up.proc.wait(timeout=60) == 2
    assert up.stderr().strip() == line
    assert not data.exists()
