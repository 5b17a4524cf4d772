"""Data workers against a real nats-server: commands published straight to CMD_<shard>, outcomes read from the WAL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from nats.js import JetStreamContext

from examples.tools import big
from kernel.dlq import DLQ_CONSUMER, DLQ_REASON, DLQ_STREAM
from kernel.errors import ConfigError
from natscluster.server import EmbeddedServer
from worker.worker import Worker, WorkerSettings
from locator.command import Command, command_encoder, command_id
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, decode_envelope
from locator.shard import shard_for
from locator.subjects import cmd_subject
from locator.topology import Topology
from projector.fold import WalEvent, fold
from projector.results import ResultStore, parse_result_ref
from system_playbooks.orchestrate.playbook import Policy
from worker.tools.runner import ToolRunner
from tests.http_servers import serving

REPO = Path(__file__).resolve().parents[2]
TENANT, PROJECT = "acme", "web"
SHARD = shard_for(TENANT, PROJECT, "", 4)
FAST = WorkerSettings(ack_wait=1.0, fetch_wait=0.2, grace=10.0)
POLICY = Policy(python_allow=("examples.tools.",), http_hosts=("127.0.0.1",))

StreamReader = Callable[[JetStreamContext, str], Any]


def make_command(
    execution_id: str, step: str, tool: dict[str, Any], *, iteration: int | None = None, attempt: int = 1,
    timeout: float | None = None,
) -> Command:  # fmt: skip
    return Command(
        v=1, command_id=command_id(execution_id, step, iteration, attempt), execution_id=execution_id,
        tenant=TENANT, project=PROJECT, affinity="", step=step, iteration=iteration, attempt=attempt, tool=tool,
        timeout=timeout,
    )  # fmt: skip


async def issue(js: JetStreamContext, command: Command, *, pool: str = "shared") -> None:
    await js.publish(
        cmd_subject(SHARD, pool), command_encoder.encode(command), headers={"Nats-Msg-Id": command.command_id}
    )


def make_worker(js: JetStreamContext, topology: Topology, tmp_path: Path, **kw: Any) -> Worker:
    kw.setdefault("runner", ToolRunner(POLICY))
    kw.setdefault("settings", FAST)
    return Worker(js, topology, results=ResultStore(f"file://{tmp_path}/objects"), worker_id="w-test", **kw)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def events_of(js: JetStreamContext, read_stream: StreamReader, execution_id: str) -> list[tuple[int, Envelope, bytes]]:
    out = []
    for seq, _subject, _msg_id, data in await read_stream(js, f"WAL_{SHARD}"):
        env = decode_envelope(data)
        if env.execution_id == execution_id:
            out.append((seq, env, data))
    return out


async def wait_for_events(
    js: JetStreamContext, read_stream: StreamReader, execution_id: str, done: Callable[[list[Envelope]], bool],
    timeout: float = 30.0,
) -> list[Envelope]:  # fmt: skip
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        envs = [env for _, env, _ in await events_of(js, read_stream, execution_id)]
        if done(envs):
            return envs
        assert asyncio.get_running_loop().time() < deadline, f"events did not arrive: {[e.type for e in envs]}"
        await asyncio.sleep(0.05)


def has(kind: str, count: int = 1) -> Callable[[list[Envelope]], bool]:
    return lambda envs: sum(e.type == kind for e in envs) >= count


async def cmd_pending(js: JetStreamContext) -> int:
    return int((await js.stream_info(f"CMD_{SHARD}")).state.messages)


# --- success, failure, the event formats --------------------------------------------------------------


async def test_noop_is_claimed_then_exits_with_its_result(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    command = make_command("101", "greet", {"kind": "noop", "result": {"hello": "world"}})
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, command)
        envs = await wait_for_events(js, read_stream, "101", has("step.exit"))
    claimed, exit_ = envs
    assert claimed.type == "command.claimed" and claimed.event_id == "101:greet:-:1:claimed:1"
    assert claimed.step == "greet" and claimed.attempt == 1 and claimed.causation_id == "101:greet:-:1"
    assert claimed.payload == {"command_id": "101:greet:-:1", "iteration": None, "delivery": 1, "worker": "w-test", "pool": "shared"}
    assert exit_.event_id == "101:greet:-:result" and exit_.attempt == 1 and exit_.causation_id == "101:greet:-:1"
    assert exit_.payload == {"result": {"hello": "world"}, "iteration": None, "command_id": "101:greet:-:1"}
    assert exit_.result_ref is None
    assert await cmd_pending(js) == 0  # acked: gone from the work queue


async def test_python_steps_and_loop_iterations(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    tool = {"kind": "python", "call": "examples.tools.math:multiply", "args": {"a": 6, "b": 7}}
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("102", "mul", tool))
        for i in range(3):
            args = {"a": i, "b": i, "label": f"item-{i}"}
            await issue(js, make_command("103", "square", {**tool, "args": args}, iteration=i))
        [exit_] = [e for e in await wait_for_events(js, read_stream, "102", has("step.exit")) if e.type == "step.exit"]
        done = await wait_for_events(js, read_stream, "103", has("command.completed", 3))
    assert exit_.payload["result"] == 42
    completed = sorted((e for e in done if e.type == "command.completed"), key=lambda e: e.payload["iteration"])
    assert [e.event_id for e in completed] == [f"103:square:{i}:result" for i in range(3)]
    assert [e.payload["result"] for e in completed] == [{"label": f"item-{i}", "value": i * i} for i in range(3)]
    assert all(e.step == "square" and e.payload["command_id"] == f"103:square:{e.payload['iteration']}:1" for e in completed)
    assert not any(e.type == "step.exit" for e in done)  # an iteration never exits the step


async def test_failures_become_call_errors(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    cases = {
        "201": {"kind": "python", "call": "examples.tools.flaky:always_fail", "args": {"message": "boom"}},
        "202": {"kind": "python", "call": "os:system", "args": {"command": "touch /tmp/pwned"}},
        "203": {"kind": "wasm", "plugin": "acme/score", "args": {}},
        "204": {"kind": "python", "call": "examples.tools.flaky:fail_until", "args": {"attempt_needed": 3}},
    }
    async with running(make_worker(js, topology, tmp_path)):
        for execution_id, tool in cases.items():
            await issue(js, make_command(execution_id, "risky", tool, attempt=2))
        errors = {}
        for execution_id in cases:
            envs = await wait_for_events(js, read_stream, execution_id, has("call.error"))
            [error] = [e for e in envs if e.type == "call.error"]
            errors[execution_id] = error
    first = errors["201"]
    assert first.event_id == "201:risky:-:2:error:1" and first.attempt == 2 and first.causation_id == "201:risky:-:2"
    assert first.payload == {
        "error": {"type": "FlakyError", "message": "boom"}, "iteration": None, "command_id": "201:risky:-:2",
    }  # fmt: skip
    assert errors["202"].payload["error"]["type"] == "denied"
    assert errors["203"].payload["error"]["type"] == "plugin_not_found"  # no such plug-in registered
    assert errors["204"].payload["error"] == {
        "type": "FlakyError", "message": "attempt 2 fails on purpose (succeeds from attempt 3)",
    }  # fmt: skip
    assert await cmd_pending(js) == 0


async def test_a_step_timeout_is_a_call_error(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    tool = {"kind": "python", "call": "examples.tools.effects:append_line",
            "args": {"path": str(tmp_path / "late.txt"), "text": "late", "delay": 1.0}}  # fmt: skip
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("205", "slow", tool, timeout=0.1))
        envs = await wait_for_events(js, read_stream, "205", has("call.error"))
    assert envs[-1].payload["error"] == {"type": "timeout", "message": "the step did not finish within 0.1 s"}


class _Json(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[str]:
    with serving(_Json) as url:
        yield url


async def test_http_steps(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader, http_server: str
) -> None:
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("301", "fetch", {"kind": "http", "url": f"{http_server}/ok"}))
        await issue(js, make_command("302", "fetch", {"kind": "http", "url": f"{http_server}/down"}))
        await issue(js, make_command("303", "fetch", {"kind": "http", "url": "http://example.com/"}))
        ok = await wait_for_events(js, read_stream, "301", has("step.exit"))
        down = await wait_for_events(js, read_stream, "302", has("call.error"))
        denied = await wait_for_events(js, read_stream, "303", has("call.error"))
    result = ok[-1].payload["result"]
    assert result["status"] == 200 and result["body"] == {"path": "/ok"}
    assert result["headers"]["content-type"] == "application/json"
    assert down[-1].payload["error"]["type"] == "http_status" and "503" in down[-1].payload["error"]["message"]
    assert denied[-1].payload["error"]["type"] == "denied"


# --- results by reference -----------------------------------------------------------------------------


async def test_a_5_mb_result_goes_by_reference(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    tool = {"kind": "python", "call": "examples.tools.big:rows", "args": {"n": 40_000}}
    expected = big.rows(40_000)
    assert len(json.dumps(expected)) > 5_000_000
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("401", "dump", tool))
        await wait_for_events(js, read_stream, "401", has("step.exit"))
    [(_, exit_, data)] = [item for item in await events_of(js, read_stream, "401") if item[1].type == "step.exit"]
    assert len(data) < DEFAULT_PAYLOAD_CAP  # the whole WAL message, not only its payload
    assert exit_.result_ref == "noetl://results/acme/web/401/dump/--1.feather"
    assert exit_.payload["result"] is None and exit_.payload["result_bytes"] > 0
    assert exit_.payload["command_id"] == "401:dump:-:1" and exit_.payload["iteration"] is None
    store = ResultStore(f"file://{tmp_path}/objects")
    assert store.get_json(exit_.result_ref) == expected
    assert store.get_table(exit_.result_ref).num_rows == 40_000


async def test_an_arrow_table_always_goes_by_reference(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    async def tabular(command: Command, *, attempt: int) -> Any:
        return pa.table({"x": [1, 2, 3]})

    async with running(make_worker(js, topology, tmp_path, runner=tabular)):
        await issue(js, make_command("402", "tab", {"kind": "noop"}, iteration=4))
        envs = await wait_for_events(js, read_stream, "402", has("command.completed"))
    ref = envs[-1].result_ref
    assert ref is not None and parse_result_ref(ref).iteration == 4
    assert ResultStore(f"file://{tmp_path}/objects").get_table(ref).column("x").to_pylist() == [1, 2, 3]


# --- poison, duplicates, redelivery -------------------------------------------------------------------


async def test_poison_goes_to_the_dlq_and_the_worker_keeps_going(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    good = make_command("501", "ok", {"kind": "noop", "result": 1})
    bad_name = command_encoder.encode(make_command("502", "x", {"kind": "noop"})).replace(b'"acme"', b'"ac.me"')
    poison = [b"not json", b'{"v": 1, "command_id": "x"}', bad_name, command_encoder.encode(good).replace(b'"v":1', b'"v":9')]
    async with running(make_worker(js, topology, tmp_path)):
        for i, data in enumerate(poison):
            await js.publish(cmd_subject(SHARD, "shared"), data, headers={"Nats-Msg-Id": f"poison-{i}"})
        await issue(js, good)
        await wait_for_events(js, read_stream, "501", has("step.exit"))
        deadline = asyncio.get_running_loop().time() + 30
        while (await js.stream_info(f"DLQ_{SHARD}")).state.messages < len(poison):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    letters = await read_stream(js, f"DLQ_{SHARD}")
    assert sorted(data for _, _, _, data in letters) == sorted(poison)
    reasons = []
    for seq, subject, msg_id, _ in letters:
        msg = await js.get_msg(f"DLQ_{SHARD}", seq)
        assert subject == f"dlq.{SHARD}.invalid_command" and msg_id is not None and msg_id.startswith(f"dlq:CMD_{SHARD}:")
        assert msg.headers is not None and msg.headers[DLQ_STREAM] == f"CMD_{SHARD}"
        assert msg.headers[DLQ_CONSUMER] == "workers_shared"
        reasons.append(msg.headers[DLQ_REASON])
    assert all(r.startswith("invalid_command: ") for r in reasons)
    assert any("JSON is malformed" in r for r in reasons) and any("missing required field" in r for r in reasons)
    assert any("invalid tenant 'ac.me'" in r for r in reasons) and any("unsupported command version" in r for r in reasons)
    assert await cmd_pending(js) == 0


async def test_a_second_success_of_the_same_step_is_stored_once(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    command = make_command("601", "once", {"kind": "noop", "result": "r"})
    async with running(make_worker(js, topology, tmp_path)):
        # The same command as two messages (as if re-issued after the CMD duplicate window): both run.
        for msg_id in ("first", "second"):
            await js.publish(cmd_subject(SHARD, "shared"), command_encoder.encode(command), headers={"Nats-Msg-Id": msg_id})
        deadline = asyncio.get_running_loop().time() + 30
        while await cmd_pending(js):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    envs = [env for _, env, _ in await events_of(js, read_stream, "601")]
    assert [e.type for e in envs] == ["command.claimed", "step.exit"]


async def test_an_unfinished_command_comes_back_as_the_next_attempt_and_gives_up_after_max_deliver(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    started = asyncio.Event()

    async def hangs(command: Command, *, attempt: int) -> Any:
        started.set()
        await asyncio.Event().wait()

    # A worker that stops without finishing (grace ran out): its command is not acked.
    stuck = make_worker(js, topology, tmp_path, runner=hangs, settings=WorkerSettings(ack_wait=1.0, fetch_wait=0.2, grace=0.1))
    async with running(stuck):
        await issue(js, make_command("701", "hang", {"kind": "noop"}))
        await asyncio.wait_for(started.wait(), 30)
    settings = WorkerSettings(ack_wait=1.0, fetch_wait=0.2, max_deliver=1)
    async with running(make_worker(js, topology, tmp_path, settings=settings)):
        envs = await wait_for_events(js, read_stream, "701", has("call.error"))
    claimed, error = envs
    assert claimed.payload["delivery"] == 1 and claimed.attempt == 1
    assert error.attempt == 2 and error.event_id == "701:hang:-:1:error:2"
    assert error.payload["error"]["type"] == "max_deliver"
    [(_, subject, _, _)] = await read_stream(js, f"DLQ_{SHARD}")
    assert subject == f"dlq.{SHARD}.max_deliver"
    assert await cmd_pending(js) == 0


# --- limits, pools, the consumer ----------------------------------------------------------------------


async def test_at_most_concurrency_commands_run_at_once(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    active = peak = 0

    async def counting(command: Command, *, attempt: int) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return command.iteration

    for i in range(8):  # all queued before the worker starts, so it always has more than it may run
        await issue(js, make_command("801", "fan", {"kind": "noop"}, iteration=i))
    async with running(make_worker(js, topology, tmp_path, runner=counting, concurrency=2)):
        envs = await wait_for_events(js, read_stream, "801", has("command.completed", 8))
    assert peak == 2
    assert sorted(e.payload["result"] for e in envs if e.type == "command.completed") == list(range(8))


async def test_pools_are_separate_and_timer_is_reserved(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader
) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        make_worker(js, topology, tmp_path, pool="timer")
    with pytest.raises(ConfigError, match="pool"):
        make_worker(js, topology, tmp_path, pool="Bad.Pool")
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("901", "gpu", {"kind": "noop", "result": "g"}), pool="gpu")
        await issue(js, make_command("902", "cpu", {"kind": "noop"}))
        await wait_for_events(js, read_stream, "902", has("step.exit"))
        assert await events_of(js, read_stream, "901") == []  # not this worker's pool
    async with running(make_worker(js, topology, tmp_path, pool="gpu")):
        envs = await wait_for_events(js, read_stream, "901", has("step.exit"))
    assert envs[-1].payload["result"] == "g"


async def test_the_consumer_is_created_or_updated_from_the_settings(js: JetStreamContext, topology: Topology, tmp_path: Path) -> None:
    for ack_wait in (1.0, 2.5):
        settings = WorkerSettings(ack_wait=ack_wait, fetch_wait=0.2, max_deliver=4)
        async with running(make_worker(js, topology, tmp_path, settings=settings)):
            pass
        for shard in range(4):
            info = await js.consumer_info(f"CMD_{shard}", "workers_shared")
            assert info.config.ack_wait == ack_wait and info.config.max_deliver == 5
            assert info.config.filter_subject == f"cmd.{shard}.shared"
    assert WorkerSettings.from_env({"NOETL_WORKER_ACK_WAIT": "7", "NOETL_WORKER_MAX_DELIVER": "3"}).max_deliver == 3
    with pytest.raises(ConfigError, match="NOETL_WORKER_ACK_WAIT"):
        WorkerSettings.from_env({"NOETL_WORKER_ACK_WAIT": "0"})
    with pytest.raises(ConfigError, match="bad worker setting"):
        WorkerSettings.from_env({"NOETL_WORKER_ACK_WAIT": "soon"})


async def test_each_command_runs_in_a_span(
    js: JetStreamContext, topology: Topology, tmp_path: Path, read_stream: StreamReader, spans: Any
) -> None:
    async with running(make_worker(js, topology, tmp_path)):
        await issue(js, make_command("1001", "traced", {"kind": "noop"}))
        await issue(js, make_command("1002", "traced", {"kind": "wasm", "plugin": "a/b"}))
        await wait_for_events(js, read_stream, "1001", has("step.exit"))
        await wait_for_events(js, read_stream, "1002", has("call.error"))
    by_execution = {
        s.attributes["noetl.execution_id"]: s for s in spans.get_finished_spans() if s.name == "worker.command"
    }
    ok, failed = by_execution["1001"], by_execution["1002"]
    assert ok.attributes["noetl.step"] == "traced" and ok.attributes["noetl.attempt"] == 1
    assert ok.attributes["noetl.command_id"] == "1001:traced:-:1" and ok.attributes["noetl.shard"] == SHARD
    assert not failed.status.is_ok and failed.status.description == "plugin_not_found"
    publishes = [s for s in spans.get_finished_spans() if s.name == "wal.publish" and s.parent is not None]
    assert any(s.parent.span_id == ok.context.span_id for s in publishes)  # the WAL publishes are its children


# --- a worker process SIGKILLed mid-step --------------------------------------------------------------

WORKER_SCRIPT = """
import asyncio, os, signal, sys
from kernel.logs import configure_logging
from worker.worker import run_workers
from locator.topology import default_topology
from projector.results import ResultStore
from system_playbooks.orchestrate.catalog import policy_from_env
from worker.tools.runner import ToolRunner

async def main() -> None:
    configure_logging(level="info", fmt="json")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await run_workers(
        [sys.argv[1]], default_topology(shard_count=4), runner=ToolRunner(policy_from_env(os.environ)),
        results=ResultStore(sys.argv[2]), stop=stop, worker_id=sys.argv[3],
    )

asyncio.run(main())
"""


def start_worker(url: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    # examples/ is not installed: the worker finds examples.tools through PYTHONPATH (the repo root).
    env |= {"PYTHONPATH": str(REPO), "NOETL_PYTHON_ALLOW": "examples.tools.", "NOETL_WORKER_ACK_WAIT": "1"}
    log = (tmp_path / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, url, f"file://{tmp_path}/objects", name],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    finally:
        log.close()


@pytest.mark.slow
async def test_a_worker_killed_mid_step_is_replaced_and_the_side_effect_runs_once(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, read_stream: StreamReader
) -> None:
    path = tmp_path / "effects.txt"
    tool = {"kind": "python", "call": "examples.tools.effects:append_line",
            "args": {"path": str(path), "text": "ran", "delay": 3.0}}  # fmt: skip
    first = start_worker(nats_server.url, tmp_path, "worker-a")
    second: subprocess.Popen[bytes] | None = None
    try:
        await issue(js, make_command("1101", "effect", tool))
        await wait_for_events(js, read_stream, "1101", has("command.claimed"))
        first.send_signal(signal.SIGKILL)  # while append_line sleeps
        assert first.wait(10) == -signal.SIGKILL
        assert not path.exists()
        second = start_worker(nats_server.url, tmp_path, "worker-b")
        await wait_for_events(js, read_stream, "1101", has("step.exit"), timeout=60)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "worker-b.log").read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert path.read_text() == "ran\n"  # exactly once, complete
    wal = await events_of(js, read_stream, "1101")
    types = [(env.type, env.attempt, env.payload.get("worker")) for _, env, _ in wal]
    assert types == [
        ("command.claimed", 1, "worker-a"), ("command.claimed", 2, "worker-b"), ("step.exit", 2, None),
    ]  # fmt: skip
    projection = fold(None, [WalEvent(seq, env) for seq, env, _ in wal])
    assert projection is not None
    step = projection.steps["effect"]
    assert step.status == "COMPLETED" and step.attempts == 2 and step.result == "ran"
    assert await cmd_pending(js) == 0
