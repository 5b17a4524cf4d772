"""Acceptance, with separate processes SIGKILLed mid-execution: a data worker mid-step, a kernel mid-way
through a 50-step execution.

Each test runs its own ``nats-server`` (bootstrapped with a 2 s lease TTL, which
the kernels are told too), ``noetl-edge kernel`` and ``noetl-edge worker``
subprocesses, starts the execution with ``noetl-edge run``, and reads the
projection from an edge in this process (the edge is stateless; what it serves
comes from NATS and object storage) to check the core invariant.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.bootstrap import StreamSettings, bootstrap
from natscluster.server import EmbeddedServer
from locator.shard import shard_for
from locator.topology import Topology, default_topology
from projector.results import ResultStore
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.playbook import Policy
from tests.conftest import cli_path
from tests.e2e.conftest import (
    EXAMPLES,
    SHARDS,
    Proc,
    check_invariant,
    e2e_env,
    ended,
    has,
    wait_for_wal,
    wal_events,
)

pytestmark = pytest.mark.slow

TENANT = "e2e"
LEASE_TTL = 2
ADMIN = "tok-e2e-crash-admin"


@pytest.fixture
async def crash_js(nc: NATS, topology: Topology) -> JetStreamContext:
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(lease_ttl_s=LEASE_TTL))
    return js


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def procs(tmp_path: Path, nats_server: EmbeddedServer, data_dir: Path) -> Iterator[list[Proc]]:
    """The kernels and workers a test starts; whatever is still running at the end is stopped."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.alive():
            proc.stop(timeout=15)


def start_kernel(procs: list[Proc], url: str, data_dir: Path, logs: Path, holder: str) -> Proc:
    env = e2e_env(NOETL_LEASE_TTL=str(LEASE_TTL), NOETL_DATA_DIR=str(data_dir))
    proc = Proc(["kernel", "--nats-url", url, "--holder", holder, "--data-dir", str(data_dir)], env=env, logs=logs,
                name=f"kernel-{holder}")  # fmt: skip
    procs.append(proc)
    proc.ready_line(f"ready kernel {holder} ")
    return proc


def start_worker(procs: list[Proc], url: str, data_dir: Path, logs: Path, name: str) -> Proc:
    env = e2e_env(NOETL_WORKER_ACK_WAIT="2", NOETL_DATA_DIR=str(data_dir))
    proc = Proc(["worker", "--nats-url", url, "--data-dir", str(data_dir)], env=env, logs=logs, name=name)
    procs.append(proc)
    return proc


def logs_of(procs: list[Proc]) -> str:
    return "\n".join(p.logs() for p in procs)


async def start_run(url: str, data_dir: Path, playbook: Path, project: str, workload: dict[str, object] | None = None) -> str:
    """``noetl-edge run PLAYBOOK`` (no --wait): register, start; the execution id."""
    args = [cli_path(), "run", str(playbook), "--tenant", TENANT, "--project", project, "--nats-url", url]
    if workload is not None:
        args += ["--workload", json.dumps(workload)]
    proc = await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, env=e2e_env(NOETL_DATA_DIR=str(data_dir)), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout.splitlines()[0])["execution_id"])


@pytest.fixture
async def local_edge(nats_server: EmbeddedServer, crash_js: JetStreamContext, data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The edge app in this process, over the test's NATS and object store."""
    app = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)],
        snapshots=SnapshotStore.from_env(data_dir=data_dir, env={}),
        results=ResultStore.from_env(data_dir=data_dir, env={}),
        policy=Policy(python_allow=("examples.tools.",)),
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://edge", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as client:
            yield client
    finally:
        await app.state.edge.cells.close()


async def test_a_worker_killed_mid_step_is_replaced_and_the_side_effect_runs_once(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    project = "worker-kill"
    effect, gate = tmp_path / "effect.txt", tmp_path / "gate"
    url = nats_server.url
    start_kernel(procs, url, data_dir, tmp_path, "k1")
    first = start_worker(procs, url, data_dir, tmp_path, "worker-a")
    # The step sleeps, then waits for the gate: the kill surely lands while it runs.
    workload = {"file": str(effect), "delay": 0.5, "gate": str(gate)}
    execution_id = await start_run(url, data_dir, EXAMPLES / "side_effect.yaml", project, workload)
    why = lambda: logs_of(procs)  # noqa: E731
    await wait_for_wal(crash_js, TENANT, project, execution_id, has("command.claimed", step="effect"), why=why)
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL and not effect.exists()

    start_worker(procs, url, data_dir, tmp_path, "worker-b")
    # Redelivered after NOETL_WORKER_ACK_WAIT (2 s) to the new worker as the step's attempt 2.
    await wait_for_wal(crash_js, TENANT, project, execution_id, has("command.claimed", 2, step="effect"), why=why)
    gate.touch()
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, ended, why=why)

    assert effect.read_text() == "ran\n"  # exactly once, complete
    served = await check_invariant(crash_js, local_edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    step = served.steps["effect"]
    assert (step.status, step.attempts, step.result) == ("COMPLETED", 2, "ran")
    assert {name: s.status for name, s in served.steps.items()} == dict.fromkeys(["effect", "after", "last"], "COMPLETED")
    claims = [(e.env.attempt, e.env.payload["delivery"]) for e in events if e.env.type == "command.claimed" and e.env.step == "effect"]
    assert claims == [(1, 1), (2, 2)]
    effect_events = [(e.env.type, e.env.attempt) for e in events if e.env.step == "effect"]
    assert effect_events.count(("step.exit", 2)) == 1 and [t for t, _ in effect_events].count("command.issued") == 1


def fifty_noops(path: Path) -> Path:
    lines = ["path: e2e/fifty", "version: 1", "steps:"]
    for n in range(50):
        nxt = f", next: [{{step: s{n + 1:02d}}}]" if n < 49 else ""
        lines.append(f"  - {{name: s{n:02d}, tool: {{kind: noop, result: {n}}}{nxt}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_kernel_killed_mid_execution_is_replaced_without_duplicate_commands(
    nats_server: EmbeddedServer, nc: NATS, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    project = "kernel-kill"
    url = nats_server.url
    first = start_kernel(procs, url, data_dir, tmp_path, "k1")
    start_worker(procs, url, data_dir, tmp_path, "worker")
    why = lambda: logs_of(procs)  # noqa: E731

    # Kill the kernel from the moment the 10th step's exit is published (a core subscription on the
    # shard's WAL subjects sees every event as it is stored), not after polling for it.
    shard = shard_for(TENANT, project, "", SHARDS)
    exits = 0

    async def on_exit(msg: Msg) -> None:
        nonlocal exits
        exits += 1
        if exits == 10 and first.alive():
            os.kill(first.proc.pid, signal.SIGKILL)

    sub = await nc.subscribe(f"wal.{shard}.{TENANT}.{project}.*.step.exit", cb=on_exit)
    try:
        execution_id = await start_run(url, data_dir, fifty_noops(tmp_path / "fifty.yaml"), project)
        await wait_for_wal(crash_js, TENANT, project, execution_id, has("step.exit", 10), why=why)
        first.proc.wait(timeout=30)
    finally:
        await sub.unsubscribe()
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    at_kill = await wal_events(crash_js, TENANT, project, execution_id)
    assert not ended([e.env for e in at_kill]), "the execution ended before the kernel was killed"
    exited_at_kill = sum(e.env.type == "step.exit" for e in at_kill)
    assert 10 <= exited_at_kill < 50

    start_kernel(procs, url, data_dir, tmp_path, "k2")
    events = await wait_for_wal(crash_js, TENANT, project, execution_id, ended, why=why)

    names = [f"s{n:02d}" for n in range(50)]
    for type in ("step.enter", "command.issued", "step.exit"):
        counts = Counter(e.env.step for e in events if e.env.type == type)
        assert counts == Counter(names), f"{type} per step: {counts}"
    served = await check_invariant(crash_js, local_edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    assert {name: (s.status, s.attempts, s.result) for name, s in served.steps.items()} == {
        name: ("COMPLETED", 1, n) for n, name in enumerate(names)
    }
