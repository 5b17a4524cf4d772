"""``noetl-edge worker --pool NAME --prepare``: the pool's consumers exist before its first worker, nothing runs."""

from __future__ import annotations

import asyncio
import subprocess

from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from locator.subjects import cmd_stream, cmd_subject, pool_consumer
from tests.conftest import cli_env, cli_path


def worker(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli_path(), "worker", *args, "--nats-url", url], capture_output=True, text=True,
                          env=cli_env(**env), timeout=60)


async def test_prepare_creates_the_pool_s_consumer_on_every_shard_and_runs_nothing(
    nats_server: EmbeddedServer, js: JetStreamContext,
) -> None:
    await js.publish(cmd_subject(2, "gpu"), b"{}", headers={"Nats-Msg-Id": "waiting-1"})
    proc = await asyncio.to_thread(worker, nats_server.url, "--pool", "gpu", "--prepare", NOETL_WORKER_ACK_WAIT="90")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "prepared pool gpu: consumer workers_gpu on CMD_0..CMD_3\n"
    for shard in range(4):
        info = await js.consumer_info(cmd_stream(shard), pool_consumer("gpu"))
        assert (info.config.filter_subject, info.config.ack_wait) == (cmd_subject(shard, "gpu"), 90)
        # The command waiting on shard 2 is counted as the pool's lag, and nobody took it.
        assert (info.num_pending, info.num_ack_pending, info.delivered.consumer_seq) == (int(shard == 2), 0, 0)
    again = await asyncio.to_thread(worker, nats_server.url, "--pool", "gpu", "--prepare")  # idempotent
    assert again.returncode == 0, again.stderr


async def test_prepare_refuses_a_reserved_or_bad_pool_in_one_line(nats_server: EmbeddedServer, js: JetStreamContext) -> None:
    for pool, message in (("timer", "pool 'timer' is reserved for the kernel's scheduler"), ("GPU", "invalid pool 'GPU'")):
        proc = await asyncio.to_thread(worker, nats_server.url, "--pool", pool, "--prepare")
        assert proc.returncode == 2 and proc.stderr.startswith(f"noetl-edge: error: {message}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    for shard in range(4):
        assert [c.name for c in await js.consumers_info(cmd_stream(shard))] == []
