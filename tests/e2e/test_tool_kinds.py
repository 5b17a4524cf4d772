"""Tool kinds from the registry, end to end through a real ``noetl-edge up`` (NATS, kernel, workers, edge):

* a third-party package (tests/fixtures/noetl_tool_echo, installed for real with pip into a temporary
  directory, offline) adds ``tool: echo`` with no change to this repository: allowed by the operator
  (``NOETL_TOOL_KINDS``) a playbook using it registers and runs to completion; not allowed, it is
  refused at register time with the path;
* ``tool: nats``: a subscriber receives the step's message, a request step gets a responder's reply,
  subjects outside ``NOETL_NATS_SUBJECTS`` or the runtime's own are refused (register time, run time);
* ``tool: duckdb``: SQL over a ~5 MB result an earlier step stored by reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from examples.tools.big import rows
from kernel.connect import close, connect
from worker.tools.registry import BUILTIN_KINDS
from tests.conftest import cli_env, cli_path
from tests.e2e.conftest import REPO, Stack, check_invariant, up_stack

pytestmark = pytest.mark.slow

ECHO_PACKAGE = REPO / "tests" / "fixtures" / "noetl_tool_echo"
KINDS = ",".join([*BUILTIN_KINDS, "echo"])
SUBJECTS = "noetl-test.orders.>,noetl-test.price,noetl-test.by-workload.*"
TENANT = "kinds"


def stack_env(site: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """The CLI environment with the echo package on the path (the repo too, for examples.tools)."""
    return cli_env(PYTHONPATH=os.pathsep.join([str(REPO), str(site)]), NOETL_PYTHON_ALLOW="examples.tools.",
                   NOETL_DATA_DIR=str(data_dir), **extra)  # fmt: skip


@pytest.fixture(scope="module")
def echo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The echo package installed by pip into a fresh directory: no index, no build isolation, no network."""
    base = tmp_path_factory.mktemp("echo")
    shutil.copytree(ECHO_PACKAGE, base / "src")  # the build writes next to its sources: not in the repository
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(base / "site"), str(base / "src")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    points = (base / "site" / "noetl_tool_echo-1.0.0.dist-info" / "entry_points.txt").read_text()
    assert "[noetl_edge.tools]" in points and "echo = noetl_tool_echo:EchoKind" in points
    return base / "site"


@pytest.fixture(scope="module")
def kinds_stack(echo_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    """``noetl-edge up`` whose operator allows echo and some NATS subjects; and its CLI environment."""
    base = tmp_path_factory.mktemp("kinds")
    env = stack_env(echo_site, base / "data", NOETL_TOOL_KINDS=KINDS, NOETL_NATS_SUBJECTS=SUBJECTS)
    with up_stack(base / "data", base, env={**env, "NOETL_NATS_PORT": "0", "NOETL_HTTP_PORT": "0"}, timeout=90) as stack:
        yield stack, env


def cli(stack: Stack, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli_path(), *args, "--nats-url", stack.nats_url], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def run(stack: Stack, env: dict[str, str], file: Path, project: str, workload: dict[str, Any] | None = None,
        ) -> tuple[int, dict[str, Any] | None, str]:  # fmt: skip
    """``noetl-edge run FILE --wait``: exit code, final projection, stderr."""
    args = ["run", str(file), "--tenant", TENANT, "--project", project, "--wait", "--timeout", "90"]
    if workload is not None:
        args += ["--workload", json.dumps(workload)]
    proc = cli(stack, env, *args, timeout=150)
    out = proc.stdout.splitlines()
    projection = json.loads(out[-1]) if len(out) > 1 and out[-1].startswith("{") else None
    return proc.returncode, projection, proc.stderr + "\n" + stack.proc.logs()


def write(tmp: Path, name: str, text: str) -> Path:
    file = tmp / f"{name}.yaml"
    file.write_text(text)
    return file


@pytest.fixture
async def nc(kinds_stack: tuple[Stack, dict[str, str]]) -> AsyncIterator[NATS]:
    client: NATS = await connect([kinds_stack[0].nats_url], name="pytest-kinds")
    try:
        yield client
    finally:
        await close(client)


async def invariant(stack: Stack, project: str, execution_id: str) -> None:
    client: NATS = await connect([stack.nats_url], name="pytest-kinds-invariant")
    try:
        async with stack.client() as edge:
            await check_invariant(client.jetstream(), edge, TENANT, project, execution_id)
    finally:
        await close(client)


# --------------------------------------------------------------------------- a third-party kind

ECHO = """\
path: kinds/echo
version: 1
workload: {name: world}
steps:
  - name: greet
    tool: {kind: noop, result: {name: "{{ workload.name }}"}}
    next: [{step: echo}]
  - name: echo
    tool: {kind: echo, text: "hello {{ steps.greet.result.name }}", times: 2}
"""


async def test_a_third_party_kind_registers_and_runs_to_completion(
    kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = kinds_stack
    code, projection, logs = run(stack, env, write(tmp_path, "echo", ECHO), "echo")
    assert code == 0 and projection is not None, logs
    assert projection["status"] == "COMPLETED", projection
    echo = projection["steps"]["echo"]
    assert echo["status"] == "COMPLETED"
    assert echo["result"] == {"echo": "hello world hello world", "step": "echo", "attempt": 1,
                              "execution_id": projection["execution_id"]}  # fmt: skip
    await invariant(stack, "echo", projection["execution_id"])


async def test_a_failing_third_party_step_reports_its_error(kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, env = kinds_stack
    failing = ECHO.replace("kinds/echo", "kinds/echo-fail").replace('"hello {{ steps.greet.result.name }}"', "fail")
    code, projection, logs = run(stack, env, write(tmp_path, "fail", failing), "echo")
    assert projection is not None and projection["status"] == "FAILED", logs
    assert projection["steps"]["echo"]["error"] == {"type": "echo_failed", "message": "asked to fail"}


async def test_without_the_allow_list_entry_the_kind_is_refused_at_register_time(
    kinds_stack: tuple[Stack, dict[str, str]], echo_site: Path, tmp_path: Path
) -> None:
    stack, _ = kinds_stack
    file = write(tmp_path, "echo", ECHO.replace("kinds/echo", "kinds/refused"))
    # The package is installed, the operator did not allow it: the default allow-list is the built-in kinds.
    env = stack_env(echo_site, stack.data_dir)
    proc = cli(stack, env, "playbook", "register", str(file), "--tenant", TENANT, "--project", "refused")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith(
        "steps[1].tool.kind: tool kind 'echo' is not allowed by the operator "
        f"(NOETL_TOOL_KINDS allows: {', '.join(BUILTIN_KINDS)})"
    ), proc.stderr
    shown = cli(stack, env, "playbook", "show", "kinds/refused", "--tenant", TENANT, "--project", "refused")
    assert shown.returncode != 0  # nothing was written
    # Allowed, its own register-time check names the field.
    env = stack_env(echo_site, stack.data_dir, NOETL_TOOL_KINDS=KINDS)
    too_many = write(tmp_path, "many", ECHO.replace("times: 2", "times: 11"))
    proc = cli(stack, env, "playbook", "register", str(too_many), "--tenant", TENANT, "--project", "refused")
    assert proc.returncode == 2 and "steps[1].tool.times: times must be between 1 and 10, got 11" in proc.stderr


async def test_the_http_edge_registers_the_third_party_kind_and_names_its_errors(
    kinds_stack: tuple[Stack, dict[str, str]]
) -> None:
    stack, _ = kinds_stack
    base = f"/api/v1/tenants/{TENANT}/projects/http/playbooks"
    headers = {"Content-Type": "application/yaml"}
    async with stack.client() as edge:
        ok = await edge.put(f"{base}/kinds/echo-http", content=ECHO.replace("kinds/echo", "kinds/echo-http"),
                            headers=headers)  # fmt: skip
        assert ok.status_code == 201, ok.text
        bad = await edge.put(f"{base}/kinds/echo-bad", headers=headers,
                             content=ECHO.replace("kinds/echo", "kinds/echo-bad").replace("times: 2", "times: 11"))
        assert bad.status_code == 422, bad.text
        assert bad.json()["field"] == "steps[1].tool.times"
        assert bad.json()["detail"].endswith("times must be between 1 and 10, got 11")
        shown = await edge.get(f"{base}/kinds/echo-http")
        assert shown.status_code == 200 and shown.json()["playbook"]["steps"][1]["tool"] == {
            "kind": "echo", "text": "hello {{ steps.greet.result.name }}", "times": 2}


def test_an_allow_list_naming_a_kind_not_installed_stops_every_process(kinds_stack: tuple[Stack, dict[str, str]],
                                                                       tmp_path: Path) -> None:  # fmt: skip
    stack, _ = kinds_stack
    env = cli_env(PYTHONPATH=str(REPO), NOETL_TOOL_KINDS="noop,echo")  # echo is not on this path
    expected = "NOETL_TOOL_KINDS: no tool kind 'echo' is installed (no entry point 'echo' in group noetl_edge.tools)"
    file = write(tmp_path, "noop", "path: kinds/noop\nversion: 1\nsteps: [{name: a, tool: {kind: noop}}]\n")
    for args in (["playbook", "register", str(file), "--tenant", TENANT, "--project", "x"], ["kernel"], ["worker"]):
        proc = cli(stack, env, *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)
    # up refuses before it starts anything: no server, no token, no data directory.
    data = tmp_path / "up-data"
    proc = subprocess.run([cli_path(), "up"], capture_output=True, text=True, timeout=60,
                          env={**env, "NOETL_DATA_DIR": str(data), "NOETL_NATS_PORT": "0"})  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == f"noetl-edge: error: {expected}", proc.stderr
    assert not data.exists()


# --------------------------------------------------------------------------- nats

NATS_PLAYBOOK = """\
path: kinds/nats
version: 1
workload: {order: 7}
steps:
  - name: announce
    tool: {kind: nats, subject: noetl-test.orders.new, data: {order: "{{ workload.order }}", by: noetl}}
    next: [{step: quote}]
  - name: quote
    tool: {kind: nats, subject: noetl-test.price, request: true, timeout: 10, data: {order: "{{ workload.order }}"}}
"""


async def test_a_nats_step_publishes_and_a_request_step_gets_the_reply(
    kinds_stack: tuple[Stack, dict[str, str]], nc: NATS, tmp_path: Path
) -> None:
    stack, env = kinds_stack
    received: list[Msg] = []
    got = asyncio.Event()

    async def on_order(msg: Msg) -> None:
        received.append(msg)
        got.set()

    async def on_price(msg: Msg) -> None:
        order = msgspec.json.decode(msg.data)["order"]
        await msg.respond(msgspec.json.encode({"order": order, "price": order * 3}))

    await nc.subscribe("noetl-test.orders.>", cb=on_order)
    await nc.subscribe("noetl-test.price", cb=on_price)
    await nc.flush()
    code, projection, logs = await asyncio.to_thread(run, stack, env, write(tmp_path, "nats", NATS_PLAYBOOK), "nats")
    assert code == 0 and projection is not None and projection["status"] == "COMPLETED", logs
    await asyncio.wait_for(got.wait(), 10)
    assert len(received) == 1 and received[0].subject == "noetl-test.orders.new"
    assert msgspec.json.decode(received[0].data) == {"order": 7, "by": "noetl"}
    assert received[0].headers is not None
    assert received[0].headers["Noetl-Step"] == f"{projection['execution_id']}:announce:-"
    assert projection["steps"]["announce"]["result"] == {"subject": "noetl-test.orders.new",
                                                      "bytes": len(received[0].data)}
    assert projection["steps"]["quote"]["result"] == {"order": 7, "price": 21}
    await invariant(stack, "nats", projection["execution_id"])


async def test_nats_subjects_are_checked_at_register_time_and_after_rendering(
    kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = kinds_stack
    for subject, why in [
        ("noetl-test.other", "is not allowed by the operator policy (NOETL_NATS_SUBJECTS: " + SUBJECTS.replace(",", ", ")),
        ("wal.0.kinds.nats.1.step.exit", "is the runtime's own (wal.>): a nats tool never publishes there"),
        ("noetl-test.orders.*", "invalid subject 'noetl-test.orders.*'"),
    ]:
        file = write(tmp_path, "bad", NATS_PLAYBOOK.replace("noetl-test.orders.new", subject))
        proc = cli(stack, env, "playbook", "register", str(file), "--tenant", TENANT, "--project", "nats")
        assert proc.returncode == 2, proc.stderr
        assert "steps[0].tool.subject: " in proc.stderr and why in proc.stderr, proc.stderr
    # A templated subject is checked when rendered, on the worker: the step fails, nothing is published.
    templated = NATS_PLAYBOOK.replace("noetl-test.orders.new", "'{{ workload.subject }}'").replace("kinds/nats", "kinds/nt")
    for subject, message in [
        ("noetl-test.by-workload.a", None),
        ("cmd.0.shared", "subject 'cmd.0.shared' is the runtime's own (cmd.>): a nats tool never publishes there"),
        ("in.kinds.nats.1.step.exit", "subject 'in.kinds.nats.1.step.exit' is the runtime's own (in.>)"),
    ]:
        code, projection, logs = run(stack, env, write(tmp_path, "nt", templated), "nats",
                                     {"order": 1, "subject": subject})  # fmt: skip
        assert projection is not None, logs
        if message is None:
            assert projection["steps"]["announce"]["status"] == "COMPLETED", logs
            continue
        assert projection["status"] == "FAILED"
        error = projection["steps"]["announce"]["error"]
        assert error["type"] == "denied" and error["message"].startswith(message), error


# --------------------------------------------------------------------------- duckdb

DUCKDB = """\
path: kinds/duckdb
version: 1
workload: {n: 40000}
steps:
  - name: load
    tool: {kind: python, call: "examples.tools.big:rows", args: {n: "{{ workload.n }}"}}
    next: [{step: totals}]
  - name: totals
    tool:
      kind: duckdb
      tables: [load]
      sql: >-
        select count(*) as n, sum(id) as ids, sum(value) as value_sum,
               count(*) filter (where even) as evens, max(name) as last
        from load
"""


async def test_a_duckdb_step_aggregates_a_5_mb_result_stored_by_reference(
    kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = kinds_stack
    n = 40000
    assert len(json.dumps(rows(n))) > 5_000_000  # what the load step returns, as JSON
    code, projection, logs = run(stack, env, write(tmp_path, "duckdb", DUCKDB), "duckdb")
    assert code == 0 and projection is not None and projection["status"] == "COMPLETED", logs
    load = projection["steps"]["load"]
    assert load["result"] is None and load["result_ref"].startswith("noetl://results/kinds/duckdb/")
    totals = projection["steps"]["totals"]
    assert totals["result"] == [{"n": n, "ids": n * (n - 1) // 2, "value_sum": n * (n - 1) / 4, "evens": n // 2,
                                 "last": f"row-{n - 1:08d}"}]  # fmt: skip
    await invariant(stack, "duckdb", projection["execution_id"])


async def test_a_duckdb_result_too_large_for_an_event_is_arrow_stored_by_reference(
    kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = kinds_stack
    playbook = DUCKDB.replace("kinds/duckdb", "kinds/duckdb-big").replace(
        "select count(*) as n, sum(id) as ids, sum(value) as value_sum,\n", "select id, name, value * 2 as twice\n"
    ).replace("               count(*) filter (where even) as evens, max(name) as last\n", "")
    code, projection, logs = run(stack, env, write(tmp_path, "big", playbook), "duckdb")
    assert code == 0 and projection is not None and projection["status"] == "COMPLETED", logs
    ref = projection["steps"]["totals"]["result_ref"]
    assert ref is not None and projection["steps"]["totals"]["result"] is None
    async with stack.client() as edge:
        resp = await edge.get(f"/api/v1/tenants/{TENANT}/projects/duckdb/executions/{projection['execution_id']}"
                              "/steps/totals/result", params={"rows": 2})  # fmt: skip
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["rows_total"] == 40000
    assert body["result"] == [{"id": 0, "name": "row-00000000", "twice": 0.0}, {"id": 1, "name": "row-00000001", "twice": 1.0}]


async def test_bad_sql_fails_the_step_with_the_duckdb_message(kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, env = kinds_stack
    playbook = DUCKDB.replace("kinds/duckdb", "kinds/duckdb-bad").replace("from load", "from lod").replace(
        "n: 40000", "n: 10")
    code, projection, logs = run(stack, env, write(tmp_path, "bad", playbook), "duckdb")
    assert projection is not None and projection["status"] == "FAILED", logs
    error = projection["steps"]["totals"]["error"]
    assert error["type"] == "sql_error" and "Table with name lod does not exist" in error["message"], error
    # Reading the file system is refused by the database itself.
    playbook = playbook.replace("kinds/duckdb-bad", "kinds/duckdb-files").replace(
        "from lod", "from read_csv('/etc/passwd')")
    code, projection, logs = run(stack, env, write(tmp_path, "files", playbook), "duckdb")
    assert projection is not None and projection["status"] == "FAILED", logs
    error = projection["steps"]["totals"]["error"]
    assert error["type"] == "sql_error" and "disabled by configuration" in error["message"], error


def test_duckdb_register_time_errors_name_their_path(kinds_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, env = kinds_stack
    for old, new, expected in [
        ("tables: [load]", "tables: [lode]", "steps[1].tool.tables[0]: unknown step 'lode'"),
        ("tables: [load]", "tables: [totals]", "steps[1].tool.tables[0]: step 'totals' cannot read its own result"),
        ("      sql: >-", "      sq: >-", "steps[1].tool: object contains unknown field `sq`"),
        ("tables: [load]", "tables: [load]\n      max_rows: 0", "steps[1].tool.max_rows: expected `int` >= 1"),
    ]:
        file = write(tmp_path, "bad", DUCKDB.replace(old, new))
        proc = cli(stack, env, "playbook", "register", str(file), "--tenant", TENANT, "--project", "duckdb")
        assert proc.returncode == 2 and expected in proc.stderr, (expected, proc.stderr)
