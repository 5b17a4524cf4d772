"""Acceptance for worker pools, with real ``noetl-edge kernel`` and ``noetl-edge worker --pool`` processes.

``examples/playbooks/pools.yaml`` pins ``prepare`` and ``report`` to the pool
``cpu`` and ``train`` to ``gpu``. Beside one worker of each, a ``shared`` worker
runs and must take none of them. The only ``gpu`` worker is SIGKILLed, mid-step
or while idle: ``train`` waits (queued for gpu, counted on ``/metrics``, never
failed) until a new ``gpu`` worker finishes it exactly once, and the served
projection equals a fresh fold of the WAL.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from natscluster.server import EmbeddedServer
from locator.envelope import Envelope
from locator.shard import shard_for
from locator.subjects import cmd_stream, pool_consumer
from tests.e2e.conftest import EXAMPLES, SHARDS, Proc, check_invariant, e2e_env, ended, executions_url, wait_for_wal
from tests.e2e.test_crashes import (  # noqa: F401 - crash_js, data_dir, local_edge and procs are fixtures
    TENANT,
    crash_js,
    data_dir,
    local_edge,
    logs_of,
    procs,
    start_kernel,
    start_run,
)

pytestmark = pytest.mark.slow

ACK_WAIT = 2
PLAYBOOK = EXAMPLES / "pools.yaml"


def start_worker(procs: list[Proc], url: str, data_dir: Path, logs: Path, pool: str, name: str) -> Proc:
    env = e2e_env(NOETL_WORKER_ACK_WAIT=str(ACK_WAIT), NOETL_DATA_DIR=str(data_dir))
    proc = Proc(["worker", "--pool", pool, "--nats-url", url, "--data-dir", str(data_dir)], env=env, logs=logs, name=name)
    procs.append(proc)
    return proc


def worker_of(claim: Envelope, workers: list[Proc]) -> str | None:
    """The name of the worker process that published ``claim`` (worker ids end with the process id)."""
    return next((w.name for w in workers if str(claim.payload.get("worker", "")).endswith(f"-{w.proc.pid}")), None)


async def pool_ready(js: JetStreamContext, pool: str, why: object) -> None:
    """Every shard has the pool's durable consumer (its first worker created them)."""
    for _ in range(600):
        try:
            for shard in range(SHARDS):
                await js.consumer_info(cmd_stream(shard), pool_consumer(pool))
            return
        except NotFoundError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"pool {pool} has no consumer on every shard:\n{why}")


async def pool_gauges(edge: httpx.AsyncClient, shard: int, pool: str) -> dict[str, float]:
    """The pool's gauges on ``shard`` from one ``/metrics`` scrape (name without ``noetl_pool_``)."""
    resp = await edge.get("/metrics")
    assert resp.status_code == 200
    labels = f'{{pool="{pool}",shard="{shard}"}} '
    return {line.partition("{")[0].removeprefix("noetl_pool_"): float(line.rpartition(" ")[2])
            for line in resp.text.splitlines() if line.startswith("noetl_pool_") and labels in line}


def has_step(type: str, step: str, count: int = 1) -> Callable[[list[Envelope]], bool]:
    return lambda envs: sum(e.type == type and e.step == step for e in envs) >= count


async def served_step(edge: httpx.AsyncClient, project: str, execution_id: str, seq: int) -> dict[str, object]:
    resp = await edge.get(executions_url(TENANT, project, execution_id), params={"min_seq": seq})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "RUNNING"
    step: dict[str, object] = body["steps"]["train"]
    return step


def check_pinned(events: list[Envelope], cpu: list[Proc], gpu: list[Proc]) -> list[tuple[str | None, int]]:
    """Every claim came from a worker of its step's pool and says so; the gpu claims as (worker, delivery)."""
    claims = [e for e in events if e.type == "command.claimed"]
    assert {e.step for e in claims} == {"prepare", "train", "report"}
    for claim in claims:
        pool, workers = ("gpu", gpu) if claim.step == "train" else ("cpu", cpu)
        assert claim.payload["pool"] == pool, claim
        assert worker_of(claim, workers) is not None, f"{claim.step} claimed by {claim.payload['worker']}, not a {pool} worker"
    return [(worker_of(c, gpu), c.payload["delivery"]) for c in claims if c.step == "train"]


def start_pools(procs: list[Proc], url: str, data_dir: Path, tmp_path: Path) -> tuple[list[Proc], list[Proc]]:
    """A kernel and a worker each of the pools cpu, shared and gpu; (the cpu workers, the gpu workers)."""
    start_kernel(procs, url, data_dir, tmp_path, "k1")
    cpu = [start_worker(procs, url, data_dir, tmp_path, "cpu", "cpu-1")]
    start_worker(procs, url, data_dir, tmp_path, "shared", "shared-1")
    return cpu, [start_worker(procs, url, data_dir, tmp_path, "gpu", "gpu-1")]


def check_once(events: list[Envelope], effect: Path) -> None:
    assert effect.read_text() == "trained on 6\n"  # the side effect ran to its end exactly once
    train = [e.type for e in events if e.step == "train"]
    assert train.count("step.exit") == 1 and train.count("command.issued") == 1
    assert "call.error" not in train and "step.failed" not in train
    assert sum(e.type == "execution.completed" for e in events) == 1


async def test_a_gpu_worker_killed_mid_step_leaves_the_step_waiting_until_a_new_one_finishes_it_once(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    project = "pools-mid-step"
    shard = shard_for(TENANT, project, "", SHARDS)
    effect, gate = tmp_path / "trained.txt", tmp_path / "gate"
    url = nats_server.url
    why = lambda: logs_of(procs)  # noqa: E731
    cpu, gpu = start_pools(procs, url, data_dir, tmp_path)
    execution_id = await start_run(url, data_dir, PLAYBOOK, project, {"file": str(effect), "gate": str(gate)})
    await wait_for_wal(crash_js, TENANT, project, execution_id, has_step("command.claimed", "train"), why=why)
    gpu[0].kill()
    assert gpu[0].proc.returncode == -signal.SIGKILL and not effect.exists()

    # Two ack waits later the command is due again, and nobody of the pool takes it: the step waits.
    await asyncio.sleep(2 * ACK_WAIT + 1)
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, has_step("command.claimed", "train"), why=why)
    step = await served_step(local_edge, project, execution_id, events[-1].seq)
    assert (step["status"], step["attempts"], step["pool"]) == ("RUNNING", 1, "gpu")
    assert not [e for e in events if e.env.type in ("call.error", "step.failed")]
    gauges = await pool_gauges(local_edge, shard, "gpu")
    assert (gauges["pending"], gauges["pull_requests"]) == (1, 0), gauges  # one command, no gpu worker asking

    gpu.append(start_worker(procs, url, data_dir, tmp_path, "gpu", "gpu-2"))
    await wait_for_wal(crash_js, TENANT, project, execution_id, has_step("command.claimed", "train", 2), why=why)
    gate.touch()
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, ended, why=why)

    envs = [e.env for e in events]
    assert check_pinned(envs, cpu, gpu) == [("gpu-1", 1), ("gpu-2", 2)]
    check_once(envs, effect)
    served = await check_invariant(crash_js, local_edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED" and served.result == "trained on 6"
    train = served.steps["train"]
    assert (train.status, train.attempts, train.pool, train.result) == ("COMPLETED", 2, "gpu", "trained on 6")
    assert (await pool_gauges(local_edge, shard, "gpu"))["pending"] == 0


async def test_a_step_for_a_pool_nobody_serves_is_queued_until_a_worker_of_it_comes(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    project = "pools-idle"
    shard = shard_for(TENANT, project, "", SHARDS)
    effect = tmp_path / "trained.txt"
    url = nats_server.url
    why = lambda: logs_of(procs)  # noqa: E731
    cpu, gpu = start_pools(procs, url, data_dir, tmp_path)
    await pool_ready(crash_js, "gpu", why())
    gpu[0].kill()  # idle: it holds nothing
    execution_id = await start_run(url, data_dir, PLAYBOOK, project, {"file": str(effect)})
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, has_step("command.issued", "train"), why=why)

    await asyncio.sleep(ACK_WAIT + 1)  # time enough for a wrong worker to take it, or for anything to fail it
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, has_step("command.issued", "train"), why=why)
    assert [e.env.type for e in events if e.env.step == "train"] == ["step.enter", "command.issued"]  # no claim
    assert not [e for e in events if e.env.type in ("call.error", "step.failed")]
    issued = next(e.env for e in events if e.env.type == "command.issued" and e.env.step == "train")
    assert issued.payload["pool"] == "gpu"
    step = await served_step(local_edge, project, execution_id, events[-1].seq)
    assert (step["status"], step["pool"], step["queued"], step["attempts"]) == ("RUNNING", "gpu", 1, 1)
    timeline = await local_edge.get(executions_url(TENANT, project, execution_id) + "/timeline", params={"step": "train"})
    assert timeline.status_code == 200, timeline.text
    assert "queued for pool gpu" in timeline.text
    gauges = await pool_gauges(local_edge, shard, "gpu")
    assert (gauges["pending"], gauges["undelivered"], gauges["unacked"]) == (1, 1, 0), gauges

    gpu.append(start_worker(procs, url, data_dir, tmp_path, "gpu", "gpu-2"))
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, ended, why=why)

    envs = [e.env for e in events]
    assert check_pinned(envs, cpu, gpu) == [("gpu-2", 1)]
    check_once(envs, effect)
    served = await check_invariant(crash_js, local_edge, TENANT, project, execution_id)
    train = served.steps["train"]
    assert (served.status, train.status, train.attempts, train.pool) == ("COMPLETED", "COMPLETED", 1, "gpu")
    assert all(s.queued is msgspec.UNSET for s in served.steps.values())
