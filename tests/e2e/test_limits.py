"""What is too big for one event never stalls a shard: a loop's aggregate goes by reference."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from nats.js import JetStreamContext

from kernel.producer import Producer
from locator.envelope import DEFAULT_PAYLOAD_CAP, new_event
from locator.ids import Snowflake
from locator.topology import default_topology
from tests.e2e.conftest import SHARDS, Stack, check_invariant, ended, executions_url, raw_messages, wait_for_wal

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "playbooks"
TENANT = "limits"

# Three iterations of ~40 KB each: every iteration fits an event, their aggregate (~120 KB) does not.
BIG_LOOP = """
path: limits/big-loop
version: 1
workload:
  parts: [0, 1, 2]
steps:
  - name: chunks
    loop: {over: "workload.parts", as: part}
    tool: {kind: python, call: "examples.tools.big:rows", args: {n: 300}}
    next: [{step: done}]
  - name: done
    tool: {kind: noop, result: "{{ steps.chunks.result_ref != null }}"}
"""


async def test_a_loop_aggregate_over_the_cap_goes_by_reference(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, tmp_path: Path
) -> None:
    playbook = tmp_path / "big-loop.yaml"
    playbook.write_text(BIG_LOOP)
    project = "big-loop"
    run = stack.run(playbook, TENANT, project)
    assert run.returncode == 0, run.stderr + stack.proc.logs()
    served = await check_invariant(stack_js, edge, TENANT, project, run.execution_id)
    chunks = served.steps["chunks"]
    assert served.status == "COMPLETED" and chunks.result is None and chunks.result_ref is not None
    assert served.steps["done"].result is True
    exits = await raw_messages(stack_js, TENANT, project, run.execution_id, "step.exit")
    assert exits and all(len(data) < DEFAULT_PAYLOAD_CAP for data in exits)

    resp = await edge.get(executions_url(TENANT, project, run.execution_id) + "/steps/chunks/result")
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert [len(part) for part in result] == [300, 300, 300]
    assert [part[-1]["id"] for part in result] == [299, 299, 299]

    # The shard kept folding and orchestrating: another execution on it runs to its end.
    after = stack.run(EXAMPLES / "linear.yaml", TENANT, project)
    assert after.returncode == 0 and after.projection is not None and after.projection["status"] == "COMPLETED"


async def test_a_request_naming_its_playbook_wrongly_fails_the_execution_with_the_reason(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    # Any NATS client can publish execution.requested: a playbook reference that is not
    # {"path", "version"?} must end the execution with a clear error, not leave it pending.
    execution_id = Snowflake().next_str()
    producer = Producer(stack_js, default_topology(shard_count=SHARDS))
    await producer.publish(new_event(
        tenant=TENANT, project="refs", execution_id=execution_id, type="execution.requested",
        event_id=f"{execution_id}:requested", payload={"playbook": "examples/linear", "workload": {}},
    ))  # fmt: skip
    events = await wait_for_wal(stack_js, TENANT, "refs", execution_id, ended)
    failed = [e.env for e in events if e.env.type == "execution.failed"]
    assert len(failed) == 1 and "invalid playbook reference 'examples/linear'" in json.dumps(failed[0].payload)
    served = await check_invariant(stack_js, edge, TENANT, "refs", execution_id)
    assert served.status == "FAILED" and served.playbook is None
