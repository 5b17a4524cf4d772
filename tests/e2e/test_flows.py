"""Acceptance, end to end with real processes: the example playbooks run by ``noetl-edge up``, started with
``noetl-edge run`` or over HTTP; cancellation; bad playbooks refused by ``run`` and by the edge.

Every test that ends an execution checks the core invariant (:func:`check_invariant`).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from locator.shard import shard_for
from projector.fold import WalEvent
from locator.subjects import CATALOG_BUCKET, wal_stream
from projector.projection import canonical, decode_projection
from system_playbooks.orchestrate.catalog import Catalog
from tests.e2e.conftest import (
    EXAMPLES,
    REPO,
    SHARDS,
    Stack,
    check_invariant,
    ended,
    executions_url,
    has,
    wait_for_wal,
    wal_events,
)

BAD = REPO / "tests" / "system_playbooks" / "orchestrate" / "bad"
TENANT = "e2e"


def step_lines(lines: list[str]) -> list[str]:
    """``run --wait`` progress lines without the results: ``step <name> <STATUS> [attempt=n]``."""
    return [line.split(" result=")[0].split(" error=")[0] for line in lines if line.startswith("step ")]


def steps_of(events: list[WalEvent], type: str) -> list[str]:
    """The step names of the events of ``type``, in WAL order."""
    return [e.env.step or "" for e in events if e.env.type == type]


# --------------------------------------------------------------------------- the examples


async def test_linear_three_steps(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "linear.yaml", TENANT, "linear")
    assert run.returncode == 0, run.stderr
    assert step_lines(run.lines) == [
        "step first COMPLETED attempt=1", "step second COMPLETED attempt=1", "step third COMPLETED attempt=1",
    ]  # fmt: skip
    assert run.lines[-1] == f"execution {run.execution_id} COMPLETED"
    served = await check_invariant(stack_js, edge, TENANT, "linear", run.execution_id)
    assert served.status == "COMPLETED" and served.playbook == {"path": "examples/linear", "version": 1}
    assert {name: (s.status, s.attempts, s.result) for name, s in served.steps.items()} == {
        "first": ("COMPLETED", 1, "first"),
        "second": ("COMPLETED", 1, "first then second"),
        "third": ("COMPLETED", 1, None),
    }
    # What `run --wait` folded from the events it followed is what the edge serves.
    assert run.projection is not None
    assert canonical(decode_projection(json.dumps(run.projection))) == canonical(served)


@pytest.mark.parametrize("notify", [True, False])
async def test_when_guard_takes_or_skips_a_step(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, notify: bool
) -> None:
    # Registered and started over HTTP (the edge's PUT and POST), the workload overriding the playbook's default.
    project = f"when-{str(notify).lower()}"
    base = f"/api/v1/tenants/{TENANT}/projects/{project}"
    put = await edge.put(f"{base}/playbooks/examples/when", content=(EXAMPLES / "when.yaml").read_bytes(),
                         headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert put.status_code == 201, put.text
    start = await edge.post(f"{base}/executions", json={"playbook": {"path": "examples/when"}, "workload": {"notify": notify}})
    assert start.status_code == 202, start.text
    assert start.json()["playbook"] == {"path": "examples/when", "version": 1}  # the latest, resolved and pinned
    execution_id = start.json()["execution_id"]
    events = await wait_for_wal(stack_js, TENANT, project, execution_id, ended, why=stack.proc.logs)
    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    assert served.steps["check"].result == {"greeting": "hello Ada"}
    assert served.steps["done"].status == "COMPLETED"
    if notify:
        assert served.steps["notify"].status == "COMPLETED" and served.steps["notify"].result == "hello Ada"
        assert steps_of(events, "step.enter") == ["check", "notify", "done"]
    else:
        assert "notify" not in served.steps
        assert steps_of(events, "step.enter") == ["check", "done"]
        assert "notify" not in steps_of(events, "command.issued")


async def test_loop_over_five_items_aggregates_in_order(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "loop.yaml", TENANT, "loop")
    assert run.returncode == 0, run.stderr
    served = await check_invariant(stack_js, edge, TENANT, "loop", run.execution_id)
    assert served.status == "COMPLETED"
    assert served.steps["square"].result == [{"label": f"item-{i}", "value": (i + 1) ** 2} for i in range(5)]
    assert served.steps["total"].result == "5 squares"
    events = await wal_events(stack_js, TENANT, "loop", run.execution_id)
    issued = [e.env for e in events if e.env.type == "command.issued" and e.env.step == "square"]
    assert sorted(int(e.payload["iteration"]) for e in issued) == [0, 1, 2, 3, 4]  # one command per item
    assert steps_of(events, "step.exit") == ["square", "total"]  # one exit for the whole loop


async def test_two_parallel_branches_joined(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "parallel.yaml", TENANT, "parallel")
    assert run.returncode == 0, run.stderr
    served = await check_invariant(stack_js, edge, TENANT, "parallel", run.execution_id)
    assert served.status == "COMPLETED"
    assert {name: s.status for name, s in served.steps.items()} == dict.fromkeys(["split", "left", "right", "merge"], "COMPLETED")
    assert served.steps["merge"].result == ["L", "R"]
    events = await wal_events(stack_js, TENANT, "parallel", run.execution_id)
    entered = steps_of(events, "step.enter")
    assert sorted(entered) == ["left", "merge", "right", "split"]  # the join entered once
    exits = steps_of(events, "step.exit")
    assert exits.index("merge") > max(exits.index("left"), exits.index("right"))


async def test_retry_succeeds_on_attempt_3(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "retry.yaml", TENANT, "retry")
    assert run.returncode == 0, run.stderr
    assert step_lines(run.lines) == [
        "step flaky RETRY attempt=2", "step flaky RETRY attempt=3", "step flaky COMPLETED attempt=3", "step after COMPLETED attempt=1",
    ]  # fmt: skip
    served = await check_invariant(stack_js, edge, TENANT, "retry", run.execution_id)
    assert served.status == "COMPLETED"
    flaky = served.steps["flaky"]
    assert (flaky.status, flaky.attempts, flaky.result, flaky.error) == ("COMPLETED", 3, 3, None)
    events = await wal_events(stack_js, TENANT, "retry", run.execution_id)
    assert [e.env.attempt for e in events if e.env.type == "call.error"] == [1, 2]


async def test_failure_after_retries_fails_the_execution(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "fail.yaml", TENANT, "fail")
    assert run.returncode == 1, run.stderr
    assert run.lines[-1] == f"execution {run.execution_id} FAILED"
    served = await check_invariant(stack_js, edge, TENANT, "fail", run.execution_id)
    assert served.status == "FAILED"
    risky = served.steps["risky"]
    assert (risky.status, risky.attempts) == ("FAILED", 2)
    assert risky.error["type"] == "FlakyError" and risky.error["message"] == "boom"
    assert "boom" in str(served.error)
    assert "never" not in served.steps
    events = await wal_events(stack_js, TENANT, "fail", run.execution_id)
    assert [e.env.type for e in events][-1] == "execution.failed"
    assert [e.env.attempt for e in events if e.env.type == "command.issued"] == [1, 2]


async def test_on_error_routes_a_failed_step(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    run = stack.run(EXAMPLES / "on_error.yaml", TENANT, "on-error")
    assert run.returncode == 0, run.stderr
    served = await check_invariant(stack_js, edge, TENANT, "on-error", run.execution_id)
    assert served.status == "COMPLETED" and served.error is None
    assert (served.steps["risky"].status, served.steps["risky"].attempts) == ("FAILED", 2)
    assert served.steps["risky"].error["message"] == "boom"
    assert (served.steps["recover"].status, served.steps["recover"].result) == ("COMPLETED", "recovered")
    assert served.steps["finish"].status == "COMPLETED"


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("how", ["http", "cli"])
async def test_cancel_stops_new_commands_and_lets_the_step_in_flight_finish(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, tmp_path: Path, how: str
) -> None:
    project = f"cancel-{how}"
    effect, gate = tmp_path / "effect.txt", tmp_path / "gate"
    # The first step holds its worker until the gate file exists: the cancel surely comes while it runs.
    workload = {"file": str(effect), "delay": 0, "gate": str(gate)}
    run = stack.run(EXAMPLES / "side_effect.yaml", TENANT, project, workload=workload, wait=False)
    assert run.returncode == 0, run.stderr
    execution_id = run.execution_id
    await wait_for_wal(stack_js, TENANT, project, execution_id, has("command.claimed", step="effect"), why=stack.proc.logs)
    if how == "http":
        resp = await edge.post(executions_url(TENANT, project, execution_id) + "/cancel")
        assert resp.status_code == 202, resp.text
        assert resp.json()["status"] == "CANCEL_REQUESTED"
    else:
        out = json.loads(stack.cli("cancel", execution_id, "--tenant", TENANT, "--project", project).stdout)
        assert out["status"] == "CANCEL_REQUESTED" and out["duplicate"] is False
    await wait_for_wal(stack_js, TENANT, project, execution_id, has("execution.cancel_requested"))
    gate.touch()
    events = await wait_for_wal(stack_js, TENANT, project, execution_id, ended, why=stack.proc.logs)
    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "CANCELLED" and served.cancel_requested

    types = [(e.seq, e.env.type, e.env.step) for e in events]
    cancel_seq = next(seq for seq, type, _ in types if type == "execution.cancel_requested")
    exit_seq = next(seq for seq, type, step in types if type == "step.exit" and step == "effect")
    assert cancel_seq < exit_seq  # the step in flight when the cancel came finished
    assert [t for seq, t, _ in types if seq > cancel_seq and t == "command.issued"] == []
    assert types[-1][1] == "execution.cancelled"
    assert (served.steps["effect"].status, served.steps["effect"].result) == ("COMPLETED", "ran")
    assert set(served.steps) == {"effect"}
    assert effect.read_text() == "ran\n"


# --------------------------------------------------------------------------- bad playbooks


async def test_http_start_of_an_unknown_playbook_is_a_404_and_writes_nothing(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    project = "start-unknown"
    base = f"/api/v1/tenants/{TENANT}/projects/{project}"
    shard = shard_for(TENANT, project, "", SHARDS)
    unknown = await edge.post(f"{base}/executions", json={"playbook": {"path": "examples/linear"}})
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/problem+json")
    assert unknown.json()["field"] == "playbook.path"
    assert unknown.json()["detail"].startswith(f"no playbook examples/linear in {TENANT}/{project}")
    put = await edge.put(f"{base}/playbooks/examples/linear", content=(EXAMPLES / "linear.yaml").read_bytes(),
                         headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert put.status_code == 201, put.text
    wrong = await edge.post(f"{base}/executions", json={"playbook": {"path": "examples/linear", "version": 2}})
    assert wrong.status_code == 404 and wrong.json()["field"] == "playbook.version", wrong.text
    # Nothing of this tenant/project reached its shard's WAL (other tests' executions may land there meanwhile).
    with pytest.raises(NotFoundError):
        await stack_js.get_msg(wal_stream(shard), seq=1, next=True, subject=f"wal.{shard}.{TENANT}.{project}.>")



@pytest.mark.parametrize("name", ["unknown_tool", "missing_step", "cycle", "bad_when"])
async def test_run_refuses_a_bad_playbook_with_its_path_and_writes_nothing(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, name: str
) -> None:
    path = BAD / f"{name}.yaml"
    source = path.read_text()
    expect = source.splitlines()[0].removeprefix("# expect: ")
    project = f"bad-{name.replace('_', '-')}"
    proc = stack.cli("run", str(path), "--tenant", TENANT, "--project", project, "--wait", check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}.yaml" in lines[0] and expect in lines[0], proc.stderr

    # The real edge refuses it the same way (the in-process PUT tests cover the other files).
    pb_path = next(line.split(":", 1)[1].strip() for line in source.splitlines() if line.startswith("path:"))
    put = await edge.put(f"/api/v1/tenants/{TENANT}/projects/{project}/playbooks/{pb_path}", content=source,
                         headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert put.status_code == 422, put.text
    assert expect in put.json()["detail"] and put.json()["field"] == expect.split(":")[0]

    # Nothing written: no catalog entry, no event of this tenant/project in its shard's WAL.
    assert await Catalog(await stack_js.key_value(CATALOG_BUCKET)).list(TENANT, project) == []
    shard = shard_for(TENANT, project, "", SHARDS)
    with pytest.raises(NotFoundError):
        await stack_js.get_msg(wal_stream(shard), seq=1, next=True, subject=f"wal.{shard}.{TENANT}.{project}.>")
