"""``noetl-edge replay`` on executions a real stack ran: the WAL alone (KV and objects wiped) gives the served
projection, and ``--check`` agrees with the playbook an execution ran and names the first decision a changed
playbook would not make (a reordered step, a removed step, a changed ``when``) with exit code 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext

from locator.shard import shard_for
from locator.urn import Urn
from tests.e2e.conftest import (
    EXAMPLES, SHARDS, Stack, check_invariant, ended, executions_url, folded_and_materialized, has, wait_for_wal, wal_events,
)  # fmt: skip

TENANT = "replay"


def urn(project: str, execution_id: str) -> str:
    return str(Urn(TENANT, project, execution_id))


@pytest.mark.parametrize(
    ("playbook", "workload"),
    [("linear", None), ("when", {"notify": True}), ("when", {"notify": False}), ("parallel", None), ("loop", None),
     ("retry", None), ("on_error", None), ("fail", None), ("big_result", None), ("callback_timeout", None)],
)
async def test_check_passes_on_the_playbook_the_execution_ran(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, playbook: str, workload: dict[str, bool] | None
) -> None:
    project = f"ok-{playbook.replace('_', '-')}-{'x' if workload is None else str(workload['notify']).lower()}"
    run = stack.run(EXAMPLES / f"{playbook}.yaml", TENANT, project, workload=workload)
    assert run.projection is not None, run.stderr
    await check_invariant(stack_js, edge, TENANT, project, run.execution_id)
    proc = stack.cli("replay", urn(project, run.execution_id), "--check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: OK:" in proc.stdout and "would decide next" not in proc.stdout
    report = json.loads(stack.cli("replay", urn(project, run.execution_id), "--check", "--json").stdout)["check"]
    assert report["divergence"] is None and report["pending"] == [] and report["decisions"] >= 4


async def test_check_passes_on_a_cancelled_callback_wait(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    run = stack.run(EXAMPLES / "callback.yaml", TENANT, "cancelled", wait=False)
    await wait_for_wal(stack_js, TENANT, "cancelled", run.execution_id, has("callback.waiting"), why=stack.proc.logs)
    # A callback that arrives and a cancel: both inputs the orchestrator decides on.
    stack.cli("cancel", run.execution_id, "--tenant", TENANT, "--project", "cancelled")
    await wait_for_wal(stack_js, TENANT, "cancelled", run.execution_id, ended, why=stack.proc.logs)
    served = await check_invariant(stack_js, edge, TENANT, "cancelled", run.execution_id)
    assert served.status == "CANCELLED"
    proc = stack.cli("replay", urn("cancelled", run.execution_id), "--check", check=False)
    assert proc.returncode == 0 and "check: OK:" in proc.stdout, proc.stdout + proc.stderr


def _version(source: Path, version: int, edit: dict[str, str]) -> str:
    text = source.read_text().replace("version: 1", f"version: {version}")
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("playbook", "workload", "version", "edit", "before", "recorded", "expected"),
    [
        # Reordered: first -> third -> second.
        ("linear", None, 2, {"next: [{step: second}]": "next: [{step: third}]",
                             "    tool: {kind: noop}": "    tool: {kind: noop}\n    next: [{step: second}]",
                             "    next: [{step: third}]\n  - name: third": "  - name: third"},
         "first", ("step.enter", "second"), ("step.enter", "third")),
        # Removed: second is gone, first -> third.
        ("linear", None, 3, {"next: [{step: second}]": "next: [{step: third}]",
                             "  - name: second\n    tool: {kind: noop, result: \"{{ steps.first.result }} then second\"}\n"
                             "    next: [{step: third}]\n": ""},
         "first", ("step.enter", "second"), ("step.enter", "third")),
        # A changed `when`: with notify false, check now goes to notify instead of done.
        ("when", {"notify": False}, 2, {"{step: notify, when: \"workload.notify == true\"}":
                                        "{step: notify, when: \"workload.notify == false\"}",
                                        "{step: done, when: \"not workload.notify\"}": "{step: done, when: \"workload.notify\"}"},
         "check", ("step.enter", "done"), ("step.enter", "notify")),
    ],
)
async def test_check_names_the_first_event_a_new_version_would_decide_differently(
    stack: Stack, stack_js: JetStreamContext, tmp_path: Path, playbook: str, workload: dict[str, bool] | None,
    version: int, edit: dict[str, str], before: str, recorded: tuple[str, str], expected: tuple[str, str],
) -> None:
    project = f"diverge-{playbook}-{version}"
    run = stack.run(EXAMPLES / f"{playbook}.yaml", TENANT, project, workload=workload)
    assert run.returncode == 0, run.stderr
    changed = tmp_path / f"{playbook}-v{version}.yaml"
    changed.write_text(_version(EXAMPLES / f"{playbook}.yaml", version, edit))
    stack.cli("playbook", "register", str(changed), "--tenant", TENANT, "--project", project)
    events = await wal_events(stack_js, TENANT, project, run.execution_id)
    first = next(e for e in events if (e.env.type, e.env.step) == recorded)
    # The first diverging event: the step's end after which the new version routes elsewhere.
    cause = next(e for e in events if (e.env.type, e.env.step) == ("step.exit", before))

    proc = stack.cli("replay", urn(project, run.execution_id), "--check", "--against-version", str(version), check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"check: DIVERGED at seq {cause.seq} (step.exit of step {before}):" in proc.stdout
    assert f"- recorded at seq {first.seq}: {recorded[0]} step {recorded[1]}" in proc.stdout
    assert f"+ examples/{playbook} v{version} decides: {expected[0]} step {expected[1]}" in proc.stdout
    doc = json.loads(stack.cli("replay", urn(project, run.execution_id), "--check", "--json", "--against-version",
                               str(version), check=False).stdout)
    divergence = doc["check"]["divergence"]
    assert divergence["seq"] == cause.seq and divergence["input"]["event_id"] == cause.env.event_id
    assert divergence["recorded"]["seq"] == first.seq and divergence["recorded"]["event_id"] == first.env.event_id
    assert (divergence["expected"][0]["type"], divergence["expected"][0]["step"]) == expected
    assert doc["check"]["playbook"] == {"path": f"examples/{playbook}", "version": version}
    # The version it ran still agrees, named or not.
    for args in ([], ["--against-version", "1"]):
        assert stack.cli("replay", urn(project, run.execution_id), "--check", *args, check=False).returncode == 0


async def test_check_errors(stack: Stack, stack_js: JetStreamContext) -> None:
    run = stack.run(EXAMPLES / "linear.yaml", TENANT, "check-errors")
    missing = stack.cli("replay", urn("check-errors", run.execution_id), "--check", "--against-version", "9", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("noetl-edge: error: cannot check against the catalog")
    # An execution that names no playbook (events only) has no decisions to check.
    started = await edge_start(stack)
    await wait_for_wal(stack_js, TENANT, "events-only", started, has("execution.requested"))
    nothing = stack.cli("replay", urn("events-only", started), "--check", check=False)
    assert nothing.returncode == 2 and "names no playbook" in nothing.stderr, nothing.stderr


async def edge_start(stack: Stack) -> str:
    async with stack.client() as client:
        resp = await client.post(executions_url(TENANT, "events-only"), json={"workload": {"a": 1}})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["execution_id"])


async def test_replay_needs_only_the_wal(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    runs = {name: stack.run(EXAMPLES / f"{name}.yaml", TENANT, "wiped") for name in ("loop", "big_result", "linear")}
    served = {}
    for name, run in runs.items():
        assert run.projection is not None, run.stderr
        served[name] = await check_invariant(stack_js, edge, TENANT, "wiped", run.execution_id)
    # Wipe the projection cache and every object (snapshots and stored results), once the kernel is done with
    # them: a segment system/materialize wrote after the wipe would be found by the edge's segment scan.
    shard = shard_for(TENANT, "wiped", "", SHARDS)
    await folded_and_materialized(stack_js, shard)
    await stack_js.purge_stream(f"KV_proj_{shard}")
    shutil.rmtree(stack.data_dir / "objects")
    for name, run in runs.items():
        doc = json.loads(stack.cli("replay", urn("wiped", run.execution_id), "--state", "--json").stdout)
        assert doc["state"] == msgspec.to_builtins(served[name]), name
        assert doc["rows"][-1]["type"] == "execution.completed"
        # The edge, with nothing but the WAL left, serves the same (its replay tier).
        resp = await edge.get(executions_url(TENANT, "wiped", run.execution_id))
        assert resp.status_code == 200 and resp.headers["X-Noetl-Source"] == "replay", resp.text
        assert resp.json() == doc["state"]

