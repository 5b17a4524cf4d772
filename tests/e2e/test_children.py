"""Acceptance, through real processes: a parent on shard A starts children on shards B and C.

Each test runs its own ``nats-server`` (4 shards), ``noetl-edge kernel`` and
``noetl-edge worker`` subprocesses and an edge in this process. The parent
(project ``family``) fans a ``playbook`` step out over five items; each child
runs in project ``kids-b`` or ``kids-c`` by its item, so the three projects
sit on three different shards (asserted). What is checked: results gathered
in item order; a kernel SIGKILLed mid-way leaves exactly five children and one
end of the parent; cancelling the parent cancels its waiting children; a
failing child routes the parent's step to ``on_error``; ``replay --check``
agrees with every record; the served projections equal a fresh fold.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from locator.envelope import Envelope, decode_wal_message
from locator.shard import shard_for
from locator.subjects import wal_stream
from projector.projection import Projection
from tests.conftest import cli_path, subject_messages
from tests.e2e.conftest import SHARDS, Proc, check_invariant, e2e_env, ended, executions_url, has, wait_for_wal
from tests.e2e.test_crashes import (  # noqa: F401 - fixtures, shared with the crash tests
    crash_js,
    data_dir,
    local_edge,
    logs_of,
    procs,
    start_kernel,
    start_worker,
)

pytestmark = pytest.mark.slow

TENANT = "e2e"
PARENT, KIDS = "family", ("kids-b", "kids-c")

CHILD = """
path: kids/child
version: 1
steps:
  - name: route
    tool: {kind: noop}
    next:
      - {step: work, when: "workload.mode == 'ok'"}
      - {step: boom, when: "workload.mode == 'fail'"}
      - {step: hold, when: "workload.mode == 'wait'"}
  - name: work
    tool:
      kind: python
      call: "examples.tools.effects:append_line"
      args: {path: "{{ workload.file }}", text: "child {{ workload.n }}", gate: "{{ workload.gate }}"}
  - {name: boom, tool: {kind: python, call: "examples.tools.flaky:always_fail", args: {message: "child {{ workload.n }} fails"}}}
  - {name: hold, tool: {kind: callback, timeout: 600}}
result: "{{ workload.n * 10 }}"
"""

PARENT_PLAYBOOK = """
path: kids/parent
version: 1
steps:
  - name: fan
    loop: {over: workload.items}
    tool:
      kind: playbook
      path: kids/child
      project: "{{ item.project }}"
      workload: {n: "{{ item.n }}", mode: "{{ item.mode }}", file: "{{ item.file }}", gate: "{{ item.gate }}"}
    next: [{step: done}]
    on_error: recover
  - {name: done, tool: {kind: noop, result: "{{ steps.fan.result }}"}}
  - {name: recover, tool: {kind: noop, result: recovered}}
"""


def linked(p: Projection) -> list[dict[str, Any]]:
    """The projection's ``children`` links (there must be some)."""
    assert isinstance(p.children, list), "the projection has no children links"
    return p.children


def test_the_three_projects_sit_on_three_shards() -> None:
    assert len({shard_for(TENANT, p, "", SHARDS) for p in (PARENT, *KIDS)}) == 3


def items(tmp_path: Path, modes: list[str], gates: list[Path]) -> list[dict[str, Any]]:
    return [
        {"n": n, "mode": mode, "project": KIDS[n % 2], "file": str(tmp_path / f"effect-{n}.txt"), "gate": str(gate)}
        for n, (mode, gate) in enumerate(zip(modes, gates, strict=True))
    ]


async def register(edge: httpx.AsyncClient) -> None:
    for project, text in ((PARENT, PARENT_PLAYBOOK), (KIDS[0], CHILD), (KIDS[1], CHILD)):
        path = "kids/parent" if text is PARENT_PLAYBOOK else "kids/child"
        resp = await edge.put(f"/api/v1/tenants/{TENANT}/projects/{project}/playbooks/{path}", content=text,
                              headers={"Content-Type": "application/yaml"})
        assert resp.status_code in (200, 201), resp.text


async def start(edge: httpx.AsyncClient, workload: dict[str, Any]) -> str:
    resp = await edge.post(executions_url(TENANT, PARENT), json={"playbook": {"path": "kids/parent"}, "workload": workload})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["execution_id"])


async def requests_of_children(js: JetStreamContext, parent: str) -> list[Envelope]:
    """Every stored ``execution.requested`` naming ``parent``, on the children's shards, in seq order per shard."""
    found: list[Envelope] = []
    for project in KIDS:
        shard = shard_for(TENANT, project, "", SHARDS)
        async for _, data in subject_messages(js, wal_stream(shard), f"wal.{shard}.{TENANT}.{project}.*.execution.requested"):
            execution_id = json.loads(data)["execution_id"]
            env = decode_wal_message(f"wal.{shard}.{TENANT}.{project}.{execution_id}.execution.requested", data,
                                     shard_count=SHARDS)
            if (env.payload.get("parent") or {}).get("execution_id") == parent:
                found.append(env)
    return found


def child_project(n: int) -> str:
    return KIDS[n % 2]


async def replay_check(url: str, data_dir: Path, project: str, execution_id: str,
                       *more: str) -> subprocess.CompletedProcess[str]:
    args = [cli_path(), "replay", execution_id, "--tenant", TENANT, "--project", project, "--check",
            "--nats-url", url, "--data-dir", str(data_dir), *more]
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True,
                                   env=e2e_env(NOETL_DATA_DIR=str(data_dir)), timeout=60)


async def run_parent(url: str, procs: list[Proc], data_dir: Path, tmp_path: Path, edge: httpx.AsyncClient,
                     modes: list[str]) -> str:
    """A kernel and a worker, the playbooks registered, and a parent started over ``modes`` (no gate held)."""
    start_kernel(procs, url, data_dir, tmp_path, "k1")
    start_worker(procs, url, data_dir, tmp_path, "worker")
    await register(edge)
    open_gate = tmp_path / "open"
    open_gate.touch()
    return await start(edge, {"items": items(tmp_path, modes, [open_gate] * len(modes))})


async def test_a_kernel_killed_mid_way_leaves_five_children_and_one_end_of_the_parent(
    nats_server: EmbeddedServer, nc: NATS, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    url = nats_server.url
    first = start_kernel(procs, url, data_dir, tmp_path, "k1")
    start_worker(procs, url, data_dir, tmp_path, "worker")
    why = lambda: logs_of(procs)  # noqa: E731
    await register(local_edge)
    # Children 0 and 1 run at once; 2, 3 and 4 wait for a gate opened only after the kill.
    open_gate, gate = tmp_path / "open", tmp_path / "gate"
    open_gate.touch()
    work = items(tmp_path, ["ok"] * 5, [open_gate, open_gate, gate, gate, gate])

    # Kill the kernel the moment the parent's WAL stores the second child's end (a core subscription
    # sees each event as it is stored): two children ended, three still running, the parent waiting.
    ends = 0

    async def on_end(msg: Msg) -> None:
        nonlocal ends
        ends += 1
        if ends == 2 and first.alive():
            os.kill(first.proc.pid, signal.SIGKILL)

    sub = await nc.subscribe(f"wal.{shard_for(TENANT, PARENT, '', SHARDS)}.{TENANT}.{PARENT}.*.callback.received",
                             cb=on_end)
    try:
        parent = await start(local_edge, {"items": work})
        await wait_for_wal(crash_js, TENANT, PARENT, parent, has("callback.received", 2), why=why)
        first.proc.wait(timeout=30)
    finally:
        await sub.unsubscribe()
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    at_kill = await wait_for_wal(crash_js, TENANT, PARENT, parent, lambda envs: True)
    assert not ended([e.env for e in at_kill]), "the parent ended before the kernel was killed"

    start_kernel(procs, url, data_dir, tmp_path, "k2")
    gate.touch()
    events = await wait_for_wal(crash_js, TENANT, PARENT, parent, ended, why=why)
    await asyncio.sleep(0.5)  # anything a confused orchestrator would still add, it adds now
    events = await wait_for_wal(crash_js, TENANT, PARENT, parent, lambda envs: True)

    requested = await requests_of_children(crash_js, parent)
    kids = [e.execution_id for e in requested]
    assert len(kids) == 5 and len(set(kids)) == 5, f"children requested: {Counter(kids)}"
    by_n = {e.payload["parent"]["iteration"]: e for e in requested}
    assert sorted(by_n) == [0, 1, 2, 3, 4]
    assert [by_n[n].project for n in range(5)] == [child_project(n) for n in range(5)]
    assert Counter(e.env.type for e in events)["execution.completed"] == 1
    assert [e.env.type for e in events].count("callback.waiting") == 5
    for n in range(5):
        assert (tmp_path / f"effect-{n}.txt").read_text() == f"child {n}\n"  # each child's work ran once

    served = await check_invariant(crash_js, local_edge, TENANT, PARENT, parent)
    assert served.status == "COMPLETED"
    assert served.steps["fan"].result == [0, 10, 20, 30, 40]
    assert served.result == [0, 10, 20, 30, 40]
    assert [(c["iteration"], c["execution_id"], c["status"]) for c in linked(served)] == [
        (n, by_n[n].execution_id, "COMPLETED") for n in range(5)
    ]
    for n in range(5):
        child = await check_invariant(crash_js, local_edge, TENANT, child_project(n), by_n[n].execution_id)
        assert (child.status, child.result) == ("COMPLETED", n * 10)
        assert child.parent == {"execution_id": parent, "project": PARENT, "affinity": "", "step": "fan", "iteration": n}
    checked = await replay_check(url, data_dir, PARENT, parent, "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    doc = json.loads(checked.stdout)
    assert doc["check"]["divergence"] is None
    summaries = [row["summary"] for row in doc["rows"]]
    for n in range(5):
        kid = by_n[n].execution_id
        assert f"waiting for child {kid} (kids/child in {child_project(n)}) [{n}]" in summaries
        assert f"child {kid} COMPLETED, result {n * 10} [{n}]" in summaries


async def test_cancelling_the_parent_cancels_its_children(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    url = nats_server.url
    why = lambda: logs_of(procs)  # noqa: E731
    parent = await run_parent(url, procs, data_dir, tmp_path, local_edge, ["wait"] * 4 + ["ok"])
    await wait_for_wal(crash_js, TENANT, PARENT, parent, has("callback.received", 1), why=why)
    requested = await requests_of_children(crash_js, parent)
    waiting = {e.payload["parent"]["iteration"]: e for e in requested if e.payload["workload"]["mode"] == "wait"}
    assert len(requested) == 5 and sorted(waiting) == [0, 1, 2, 3]
    for e in waiting.values():
        await wait_for_wal(crash_js, TENANT, e.project, e.execution_id, has("callback.waiting"), why=why)

    resp = await local_edge.post(executions_url(TENANT, PARENT, parent) + "/cancel")
    assert resp.status_code == 202, resp.text
    await wait_for_wal(crash_js, TENANT, PARENT, parent, has("execution.cancelled"), why=why)
    for e in waiting.values():
        events = await wait_for_wal(crash_js, TENANT, e.project, e.execution_id, has("execution.cancelled"), why=why)
        cancel = [x.env for x in events if x.env.type == "execution.cancel_requested"]
        assert [(c.event_id, c.payload) for c in cancel] == [(f"{e.execution_id}:cancel", {"by": "parent", "parent": parent})]
        child = await check_invariant(crash_js, local_edge, TENANT, e.project, e.execution_id)
        assert child.status == "CANCELLED"
    # The children's ends reach the parent's links too.
    await wait_for_wal(crash_js, TENANT, PARENT, parent, has("callback.received", 5), why=why)
    served = await check_invariant(crash_js, local_edge, TENANT, PARENT, parent)
    assert served.status == "CANCELLED"
    assert [c["status"] for c in linked(served)] == ["CANCELLED"] * 4 + ["COMPLETED"]
    checked = await replay_check(url, data_dir, PARENT, parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_failing_child_routes_the_parents_step_to_on_error(
    nats_server: EmbeddedServer, crash_js: JetStreamContext, local_edge: httpx.AsyncClient,
    procs: list[Proc], data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    url = nats_server.url
    why = lambda: logs_of(procs)  # noqa: E731
    parent = await run_parent(url, procs, data_dir, tmp_path, local_edge, ["ok", "ok", "fail", "ok", "ok"])
    await wait_for_wal(crash_js, TENANT, PARENT, parent, ended, why=why)
    served = await check_invariant(crash_js, local_edge, TENANT, PARENT, parent)
    assert served.status == "COMPLETED"
    fan = served.steps["fan"]
    assert fan.status == "FAILED"
    assert fan.error["iteration"] == 2 and fan.error["error"]["type"] == "child_failed"
    assert fan.error["error"]["error"]["error"]["message"] == "child 2 fails"
    assert served.steps["recover"].status == "COMPLETED" and "done" not in served.steps
    assert served.result == "recovered"
    failed = next(e for e in await requests_of_children(crash_js, parent) if e.payload["parent"]["iteration"] == 2)
    child = await check_invariant(crash_js, local_edge, TENANT, failed.project, failed.execution_id)
    assert child.status == "FAILED"
    checked = await replay_check(url, data_dir, PARENT, parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
