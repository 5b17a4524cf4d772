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
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.bootstrap import StreamSettings, bootstrap
from kernel.producer import Producer
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, encode_envelope
from locator.subjects import CATALOG_BUCKET, cmd_stream, wal_subject
from natscluster.server import EmbeddedServer
from locator.shard import shard_for
from locator.topology import Topology, default_topology
from projector.results import ResultStore
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.check import check
from system_playbooks.orchestrate.inline import Inliner
from system_playbooks.orchestrate.planner import plan
from system_playbooks.orchestrate.playbook import Playbook, Policy
from system_playbooks.orchestrate.start import requested_event
from system_playbooks.orchestrate.state import apply, new_state
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


def start_kernel(procs: list[Proc], url: str, data_dir: Path, logs: Path, holder: str, **extra: str) -> Proc:
    env = e2e_env(NOETL_LEASE_TTL=str(LEASE_TTL), NOETL_DATA_DIR=str(data_dir), **extra)
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
    # Every step crosses a worker here (noop steps would otherwise run inline, the 50 in one batch: see
    # test_an_orchestrator_cut_short_between_inline_events_finishes_once for that window).
    first = start_kernel(procs, url, data_dir, tmp_path, "k1", NOETL_INLINE_STEPS="0")
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

    start_kernel(procs, url, data_dir, tmp_path, "k2", NOETL_INLINE_STEPS="0")
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


INLINE_CHAIN = """\
path: e2e/inline-chain
version: 1
steps:
  - {name: a, tool: {kind: noop, result: 1}, next: [{step: b}]}
  - {name: b, tool: {kind: noop, result: "{{ steps.a.result + 1 }}"}, next: [{step: each}]}
  - name: each
    loop: {over: "[steps.b.result, 3]", as: n}
    tool: {kind: noop, result: "{{ n * 10 }}"}
    next: [{step: c}]
  - {name: c, tool: {kind: noop, result: "{{ steps.each.result }}"}}
"""


def inline_batch(playbook: Playbook, requested: Envelope) -> list[Envelope]:
    """Everything an orchestrator running noop steps inline publishes for ``requested``, in order: one batch."""
    state = new_state(requested)
    apply(state, 1, requested)
    inliner = Inliner(enabled=True, policy=Policy(), payload_cap=DEFAULT_PAYLOAD_CAP)
    decided = plan(state, playbook, now_ms=int(time.time() * 1000), new_token=lambda: "t",
                   payload_cap=DEFAULT_PAYLOAD_CAP, inline=lambda step, c: inliner.outcome(step, c, claimed=False))
    assert not decided.commands and decided.events[-1].type == "execution.completed", decided
    return decided.events


async def test_an_orchestrator_cut_short_between_inline_events_finishes_once(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path, topology: Topology,
) -> None:  # fmt: skip
    """An orchestrator that died while publishing a batch of inline steps' events left any prefix of it in the
    WAL: the next one (a fresh kernel, no worker anywhere) finishes each execution with every event stored
    once. Every cut is tried, each on its own execution, once with the record just made and once with it
    three hours old (past the duplicate window: a command issued to a worker would no longer be re-sent, and a
    decision published again would be stored again)."""
    project = "inline-cut"
    catalog = Catalog(await crash_js.key_value(CATALOG_BUCKET))
    playbook = await catalog.register(TENANT, project, INLINE_CHAIN, policy=Policy())
    ref = {"path": playbook.path, "version": playbook.version}
    producer = Producer(crash_js, topology)
    old = (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    full: dict[str, list[str]] = {}
    next_id = 7_000_000_000
    cuts = len(inline_batch(playbook, requested_event(
        tenant=TENANT, project=project, affinity="", execution_id="1", playbook=ref, workload={})))
    for aged in (False, True):
        for cut in range(cuts):  # 0: only the request stored
            next_id += 1
            requested = requested_event(tenant=TENANT, project=project, affinity="", execution_id=str(next_id),
                                        playbook=ref, workload={})
            batch = inline_batch(playbook, requested)
            full[str(next_id)] = [requested.event_id, *(env.event_id for env in batch)]
            for env in [requested, *batch[:cut]]:
                if not aged:
                    await producer.publish(env)
                    continue
                # Published long ago: its time is old, and the server's duplicate window has forgotten its
                # Nats-Msg-Id (published without one here), so only the record can keep the events single.
                subject = wal_subject(shard_for(TENANT, project, "", SHARDS), TENANT, project, env.execution_id,
                                      env.type)
                await crash_js.publish(subject, encode_envelope(msgspec.structs.replace(env, ts=old)))
    assert cuts > 20

    start_kernel(procs, nats_server.url, data_dir, tmp_path, "k1")  # no worker: only inline steps can finish
    why = lambda: logs_of(procs)  # noqa: E731
    for execution_id, ids in full.items():
        events = await wait_for_wal(crash_js, TENANT, project, execution_id, ended, why=why)
        stored = Counter(e.env.event_id for e in events)
        assert stored == Counter(ids), f"{execution_id}: {stored - Counter(ids)} extra, {Counter(ids) - stored} missing"
        served = await check_invariant(crash_js, local_edge, TENANT, project, execution_id)
        assert served.status == "COMPLETED" and served.result == [20, 30], served
        report = check(events, playbook)
        assert report.divergence is None and report.pending == [], report
    for shard in range(SHARDS):
        assert (await crash_js.stream_info(cmd_stream(shard))).state.messages == 0, "a command went to a worker"
