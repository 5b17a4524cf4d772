"""Acceptance, end to end: a 5 MB result by reference, and callbacks (resumed over HTTP, timed out, reused, unknown).

Every test that ends an execution checks the core invariant (:func:`check_invariant`).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from pathlib import Path

import httpx
import msgspec
import pyarrow.feather as feather
from nats.js import JetStreamContext

from examples.tools.big import rows
from tests.conftest import cli_path
from tests.e2e.conftest import (
    EXAMPLES,
    Stack,
    check_invariant,
    ended,
    executions_url,
    has,
    raw_messages,
    wait_for_wal,
    wal_events,
)

TENANT = "e2e"
PAYLOAD_CAP = 64 * 1024
ARROW_FILE = "application/vnd.apache.arrow.file"


# --------------------------------------------------------------------------- results by reference


async def test_a_5_mb_result_is_stored_by_reference_and_fetched_back(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, tmp_path: Path
) -> None:
    project = "big"
    run = stack.run(EXAMPLES / "big_result.yaml", TENANT, project)
    assert run.returncode == 0, run.stderr
    execution_id = run.execution_id
    expected = rows(40_000)
    assert len(msgspec.json.encode(expected)) > 5 * 1024 * 1024

    # The projection (served and folded) holds the reference, not the rows.
    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    step = served.steps["rows"]
    ref = step.result_ref
    assert step.status == "COMPLETED" and step.result is None
    assert ref is not None and ref.startswith(f"noetl://results/{TENANT}/{project}/{execution_id}/rows/")
    assert served.steps["count"].result == "done"

    # Stored in object storage (the stack's default file:// store under its data dir).
    stored = stack.data_dir / "objects" / ref.removeprefix("noetl://")
    assert stored.is_file() and stored.stat().st_size > 0

    # The WAL message that refers to it is under the payload cap.
    raw = next(m for m in await raw_messages(stack_js, TENANT, project, execution_id, "step.exit")
               if msgspec.json.decode(m)["step"] == "rows")  # fmt: skip
    assert len(raw) < PAYLOAD_CAP
    rows_exit = msgspec.json.decode(raw)
    assert rows_exit["result_ref"] == ref and rows_exit["payload"]["result"] is None
    assert rows_exit["payload"]["result_bytes"] == stored.stat().st_size  # the Feather object's size (zstd)

    # The edge's projection and its result route.
    got = (await edge.get(executions_url(TENANT, project, execution_id))).json()
    assert got["steps"]["rows"]["result_ref"] == ref and got["steps"]["rows"]["result"] is None
    resp = await edge.get(executions_url(TENANT, project, execution_id) + "/steps/rows/result")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["result_ref"]) == ("COMPLETED", ref)
    assert body["result"] == expected
    arrow = await edge.get(executions_url(TENANT, project, execution_id) + "/steps/rows/result", headers={"Accept": ARROW_FILE})
    assert arrow.status_code == 200 and arrow.headers["content-type"].startswith(ARROW_FILE)
    table = feather.read_table(io.BytesIO(arrow.content))
    assert table.num_rows == 40_000 and table.column_names == ["id", "name", "value", "even", "pad"]
    assert table.slice(0, 3).to_pylist() == expected[:3]
    assert arrow.content == stored.read_bytes()

    # `noetl-edge result` fetches it too, as JSON or as the Feather file.
    where = ["--tenant", TENANT, "--project", project, "--data-dir", str(stack.data_dir)]
    out = json.loads(stack.cli("result", execution_id, "rows", *where).stdout)
    assert out["result_ref"] == ref and out["result"] == expected
    copy = tmp_path / "rows.feather"
    stack.cli("result", execution_id, "rows", *where, "--out", str(copy))
    assert copy.read_bytes() == stored.read_bytes()


# --------------------------------------------------------------------------- callbacks


async def test_callback_resumed_over_http_and_its_token_used_once(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    project = "callback"
    # `run --wait` in the background, as a user would: it prints the callback path and waits.
    run = subprocess.Popen(
        [cli_path(), "run", str(EXAMPLES / "callback.yaml"), "--tenant", TENANT, "--project", project, "--wait",
         "--timeout", "60", "--nats-url", stack.nats_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env(),
    )  # fmt: skip
    try:
        assert run.stdout is not None
        started = json.loads(await asyncio.wait_for(asyncio.to_thread(run.stdout.readline), 30))
        execution_id = started["execution_id"]
        events = await wait_for_wal(stack_js, TENANT, project, execution_id, has("callback.waiting"), why=stack.proc.logs)
        waiting = next(e.env for e in events if e.env.type == "callback.waiting")
        token, path = waiting.payload["callback_id"], waiting.payload["callback_path"]
        assert path == f"/api/v1/callbacks/{token}"
        printed = [await asyncio.wait_for(asyncio.to_thread(run.stdout.readline), 30) for _ in range(2)]
        assert printed[1].strip() == f"step approval WAITING callback={path}", printed

        # The token is the credential: no Authorization header.
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as anonymous:
            unknown = await anonymous.post("/api/v1/callbacks/not-a-token", json={"approved": True})
            assert unknown.status_code == 404, unknown.text
            forged = await anonymous.post(f"/api/v1/callbacks/{token[:-1]}{'A' if token[-1] != 'A' else 'B'}", json={})
            assert forged.status_code == 404, forged.text
            first = await anonymous.post(path, json={"approved": True, "by": "ops"})
            assert first.status_code == 202, first.text
            assert first.json()["status"] == "RECEIVED"
            again = await anonymous.post(path, json={"approved": False})
            assert again.status_code == 409, again.text
        out, err = await asyncio.to_thread(run.communicate, timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    assert out.splitlines()[-2] == f"execution {execution_id} COMPLETED"

    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    approval = served.steps["approval"]
    assert (approval.status, approval.result) == ("COMPLETED", {"approved": True, "by": "ops"})
    assert served.steps["approved"].status == "COMPLETED" and "timed_out" not in served.steps
    events = await wal_events(stack_js, TENANT, project, execution_id)
    assert [e.env.type for e in events].count("callback.received") == 1
    # Used once, still refused after the execution ended.
    assert (await edge.post(path, json={"approved": True})).status_code == 409


async def test_callback_timeout_routes_to_on_error(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    project = "callback-timeout"
    run = stack.run(EXAMPLES / "callback_timeout.yaml", TENANT, project)
    assert run.returncode == 0, run.stderr
    execution_id = run.execution_id
    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "COMPLETED"
    approval = served.steps["approval"]
    assert approval.status == "FAILED" and approval.error["type"] == "timeout"
    assert (served.steps["timed_out"].status, served.steps["timed_out"].result) == ("COMPLETED", "no answer")
    assert "approved" not in served.steps

    # A callback that comes after the timeout is refused, and changes nothing.
    events = await wal_events(stack_js, TENANT, project, execution_id)
    path = next(e.env for e in events if e.env.type == "callback.waiting").payload["callback_path"]
    late = await edge.post(path, json={"approved": True})
    assert late.status_code == 409, late.text
    after = await wal_events(stack_js, TENANT, project, execution_id)
    assert [e.seq for e in after] == [e.seq for e in events]
    assert ended([e.env for e in after])


async def test_a_callback_for_a_cancelled_execution_is_refused(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    project = "callback-cancel"
    run = stack.run(EXAMPLES / "callback.yaml", TENANT, project, wait=False)
    assert run.returncode == 0, run.stderr
    execution_id = run.execution_id
    events = await wait_for_wal(stack_js, TENANT, project, execution_id, has("callback.waiting"), why=stack.proc.logs)
    path = next(e.env for e in events if e.env.type == "callback.waiting").payload["callback_path"]
    assert (await edge.post(executions_url(TENANT, project, execution_id) + "/cancel")).status_code == 202
    events = await wait_for_wal(stack_js, TENANT, project, execution_id, ended, why=stack.proc.logs)
    assert events[-1].env.type == "execution.cancelled"

    # The execution is over: the callback resumes nothing, so it is refused as one after a timeout is,
    # and the waiting step is not reopened in a CANCELLED execution.
    late = await edge.post(path, json={"approved": True})
    after = await wal_events(stack_js, TENANT, project, execution_id)
    served = await check_invariant(stack_js, edge, TENANT, project, execution_id)
    assert served.status == "CANCELLED"
    assert late.status_code == 409, late.text
    assert [e.env.type for e in after if e.seq > events[-1].seq] == []
    assert served.steps["approval"].status == "WAITING"
