"""Acceptance (issue 18): ``noop`` steps run inline by ``system/orchestrate`` record the same projection and the
same ``replay --check`` result as the same steps run by a data worker.

Two ``noetl-edge up`` stacks run the same playbooks: this module's ``stack`` (inline steps on, the default)
and one started with ``NOETL_INLINE_STEPS=0`` (every step crosses a worker, as before). For each execution:

* the served projection equals a fresh fold of its WAL on both (:func:`check_invariant`);
* the two projections are equal once normalised: the execution id replaced by a placeholder wherever it
  appears (result references name it), and the times (``created_at``, ``updated_at``, each step's
  ``started_at``/``ended_at``) and ``last_seq`` (a WAL position, which depends on the other executions
  of the shard) dropped; ``event_count``, statuses, attempts, results, pools and queue counts are compared;
* the two WAL histories hold the same events, as a multiset (two branches may interleave otherwise): type,
  step, attempt, event id, causation id and payload, the execution id replaced and the claim's ``worker``
  dropped (a worker's id, or ``inline``); which claims said ``inline`` is checked on its own;
* ``noetl-edge replay … --check`` passes on both.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext

from locator.urn import Urn
from projector.fold import WalEvent
from system_playbooks.orchestrate.playbook import Policy, load_playbook, tool_kind
from tests.conftest import cli_path
from tests.e2e.conftest import EXAMPLES, Stack, check_invariant, e2e_env, jetstream_of, up_stack, wal_events

TENANT = "inline"
NOOP_LOOP = """\
path: e2e/noop-loop
version: 1
workload: {items: [3, 1, 2]}
steps:
  - name: each
    loop: {over: "workload.items", as: n}
    tool: {kind: noop, result: {n: "{{ n }}", at: "{{ index }}"}}
    next: [{step: sum}]
  - name: sum
    tool: {kind: noop, result: "{{ len(steps.each.result) }} items"}
"""


@pytest.fixture(scope="module")
def stack_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second ``noetl-edge up`` with ``NOETL_INLINE_STEPS=0``: every step crosses a worker."""
    base = tmp_path_factory.mktemp("up-off")
    data_dir = base / "data"
    env = e2e_env(NOETL_DATA_DIR=str(data_dir), NOETL_NATS_PORT="0", NOETL_HTTP_PORT="0", NOETL_INLINE_STEPS="0")
    with up_stack(data_dir, base, env=env, name="up-off") as running:
        yield running


@pytest.fixture
async def off_js(stack_off: Stack) -> AsyncIterator[JetStreamContext]:
    async with jetstream_of(stack_off, name="pytest-e2e-off") as js:
        yield js


@pytest.fixture
async def off_edge(stack_off: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with stack_off.client() as client:
        yield client


def _replace(value: Any, execution_id: str) -> Any:
    return json.loads(json.dumps(value).replace(execution_id, "<execution>"))


def normal_projection(served: Any, execution_id: str) -> dict[str, Any]:
    p = _replace(msgspec.to_builtins(served), execution_id)
    for key in ("created_at", "updated_at", "last_seq"):
        p.pop(key)
    for step in p["steps"].values():
        step.pop("started_at")
        step.pop("ended_at")
    return p  # type: ignore[no-any-return]


def normal_events(events: list[WalEvent], execution_id: str) -> list[str]:
    out = []
    for e in events:
        env = e.env
        payload = {k: v for k, v in env.payload.items() if not (env.type == "command.claimed" and k == "worker")}
        row = {"type": env.type, "step": env.step, "attempt": env.attempt, "event_id": env.event_id,
               "causation_id": env.causation_id, "result_ref": env.result_ref, "payload": payload}
        out.append(json.dumps(_replace(row, execution_id), sort_keys=True))
    return sorted(out)


def claimers(events: list[WalEvent]) -> dict[str, set[str]]:
    """Per step: the ``worker`` of its claims."""
    out: dict[str, set[str]] = {}
    for e in events:
        if e.env.type == "command.claimed":
            out.setdefault(e.env.step or "", set()).add(e.env.payload["worker"])
    return out


@pytest.mark.parametrize(
    ("playbook", "workload"),
    [("linear", None), ("when", {"notify": True}), ("when", {"notify": False}), ("parallel", None), ("loop", None),
     ("big_result", None), ("noop_loop", None), ("pools_free", None)],
)
async def test_inline_steps_record_what_worker_run_steps_record(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient,
    stack_off: Stack, off_js: JetStreamContext, off_edge: httpx.AsyncClient,
    tmp_path: Path, playbook: str, workload: dict[str, Any] | None,
) -> None:  # fmt: skip
    if playbook == "noop_loop":
        source = tmp_path / "noop_loop.yaml"
        source.write_text(NOOP_LOOP)
    elif playbook == "pools_free":
        # A noop that names its pool goes to a worker of it even with inline steps on (here: shared, served).
        source = tmp_path / "pools_free.yaml"
        source.write_text("path: e2e/pooled\nversion: 1\nsteps:\n  - {name: a, tool: {kind: noop, result: 1}, "
                          "next: [{step: b}]}\n  - {name: b, pool: shared, tool: {kind: noop, result: 2}}\n")
    else:
        source = EXAMPLES / f"{playbook}.yaml"
    project = f"{playbook.replace('_', '-')}-{'x' if workload is None else str(workload['notify']).lower()}"
    pb = load_playbook(source.read_text(), policy=Policy(python_allow=("examples.tools.",)))
    noops = {s.name for s in pb.steps if tool_kind(s.tool) == "noop" and s.pool is None}

    seen: dict[str, tuple[dict[str, Any], list[str], dict[str, set[str]]]] = {}
    for name, st, js, client in (("on", stack, stack_js, edge), ("off", stack_off, off_js, off_edge)):
        run = st.run(source, TENANT, project, workload=workload)
        assert run.returncode == 0 and run.projection is not None, f"{name}: {run.stderr}\n{st.proc.logs()}"
        served = await check_invariant(js, client, TENANT, project, run.execution_id)
        assert served.status == "COMPLETED", f"{name}: {served}"
        check = st.cli("replay", str(Urn(TENANT, project, run.execution_id)), "--check", "--json", check=False)
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
        report = json.loads(check.stdout)["check"]
        assert report["divergence"] is None and report["pending"] == [], f"{name}: {report}"
        events = await wal_events(js, TENANT, project, run.execution_id)
        seen[name] = (normal_projection(served, run.execution_id), normal_events(events, run.execution_id),
                      claimers(events))

    (on_projection, on_events, on_claims), (off_projection, off_events, off_claims) = seen["on"], seen["off"]
    assert on_projection == off_projection
    assert on_events == off_events
    assert on_claims.keys() == off_claims.keys()
    for step, workers in on_claims.items():
        assert workers == {"inline"} if step in noops else "inline" not in workers, (step, workers)
    assert all("inline" not in workers for workers in off_claims.values()), off_claims


@pytest.mark.parametrize("command", ["up", "kernel"])
def test_a_bad_inline_setting_stops_up_and_the_kernel_before_anything_starts(command: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = e2e_env(NOETL_DATA_DIR=str(data_dir), NOETL_NATS_PORT="0", NOETL_HTTP_PORT="0", NOETL_INLINE_STEPS="maybe")
    args = [cli_path(), command] + (["--nats-url", "nats://127.0.0.1:1"] if command == "kernel" else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "noetl-edge: error: NOETL_INLINE_STEPS must be one of 1, on, true, yes, 0, off, false, no; got 'maybe'"
    ]
    assert not data_dir.exists()
