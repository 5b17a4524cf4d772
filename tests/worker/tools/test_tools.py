"""The data workers' tools: noop, python (policy-checked again at run time), http (against a local server), and refusals."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest

from locator.command import Command, command_id
from system_playbooks.orchestrate.errors import OrchestrateError
from system_playbooks.orchestrate.playbook import Policy
from worker.tools.runner import (
    ToolContext,
    ToolError,
    ToolRunner,
    run_tool,
)
from tests.http_servers import serving

EXAMPLES = Policy(python_allow=("examples.tools.",))


def ctx(policy: Policy = EXAMPLES, *, attempt: int = 1, iteration: int | None = None) -> ToolContext:
    return ToolContext(execution_id="7", step="s", iteration=iteration, attempt=attempt, policy=policy)


async def fails(tool: dict[str, Any], context: ToolContext) -> ToolError:
    with pytest.raises(ToolError) as info:
        await run_tool(tool, context)
    return info.value


# --- noop, wasm, callback, malformed ----------------------------------------------------------------


async def test_noop_returns_its_rendered_result() -> None:
    assert await run_tool({"kind": "noop", "result": {"a": [1, "x"]}}, ctx()) == {"a": [1, "x"]}
    assert await run_tool({"kind": "noop"}, ctx()) is None


async def test_wasm_and_callback_never_run_on_a_worker() -> None:
    wasm = await fails({"kind": "wasm", "plugin": "acme/score", "args": {}}, ctx())
    assert wasm.type == "unsupported" and "not bound to a plug-in registry" in wasm.message
    callback = await fails({"kind": "callback", "timeout": 5}, ctx())
    assert callback.type == "unsupported" and "never runs on a data worker" in callback.message


@pytest.mark.parametrize("tool", [{"kind": "shell", "cmd": "ls"}, {"call": "x:y"}, {"kind": "python"}, {"kind": "noop", "typo": 1}])
async def test_a_malformed_tool_is_an_invalid_tool_error(tool: dict[str, Any]) -> None:
    error = await fails(tool, ctx())
    assert error.type == "invalid_tool" and "not a valid playbook tool" in error.message
    assert isinstance(error, OrchestrateError) and error.payload() == {"type": error.type, "message": error.message}


# --- python -----------------------------------------------------------------------------------------


async def test_python_calls_the_function_with_its_args() -> None:
    tool = {"kind": "python", "call": "examples.tools.math:multiply", "args": {"a": 6, "b": 7}}
    assert await run_tool(tool, ctx()) == 42
    tool["args"] = {"a": 2, "b": 3, "label": "item-0"}
    assert await run_tool(tool, ctx()) == {"label": "item-0", "value": 6}


async def test_python_passes_noetl_to_a_function_that_asks_for_it() -> None:
    tool = {"kind": "python", "call": "examples.tools.flaky:fail_until", "args": {"attempt_needed": 3}}
    early = await fails(tool, ctx(attempt=2))
    assert early.type == "FlakyError" and "attempt 2 fails on purpose" in early.message
    assert await run_tool(tool, ctx(attempt=3)) == 3


async def test_python_exceptions_become_tool_errors_with_the_class_name() -> None:
    tool = {"kind": "python", "call": "examples.tools.flaky:always_fail", "args": {"message": "boom"}}
    assert (await fails(tool, ctx())).payload() == {"type": "FlakyError", "message": "boom"}


async def test_python_is_checked_against_the_policy_again_at_run_time() -> None:
    tool = {"kind": "python", "call": "examples.tools.math:multiply", "args": {"a": 1, "b": 1}}
    error = await fails(tool, ctx(Policy()))
    assert error.type == "denied" and "not allowed by the operator policy" in error.message
    error = await fails({"kind": "python", "call": "os:system", "args": {"command": "true"}}, ctx())
    assert error.type == "denied" and "examples.tools." in error.message
    assert (await fails({"kind": "python", "call": "os.system"}, ctx())).type == "invalid_tool"


async def test_python_import_and_argument_problems() -> None:
    missing = await fails({"kind": "python", "call": "examples.tools.nothing:here"}, ctx())
    assert missing.type == "import_error" and "examples.tools.nothing" in missing.message
    absent = await fails({"kind": "python", "call": "examples.tools.math:divide"}, ctx())
    assert absent.type == "import_error" and "no callable 'divide'" in absent.message
    bad = await fails({"kind": "python", "call": "examples.tools.math:multiply", "args": {"a": 1}}, ctx())
    assert bad.type == "bad_args" and "'b'" in bad.message
    reserved = {"kind": "python", "call": "examples.tools.flaky:fail_until", "args": {"attempt_needed": 1, "noetl": {}}}
    assert (await fails(reserved, ctx())).type == "bad_args"


@pytest.fixture
def tool_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throw-away module of odd tools, importable for this test only."""
    name = f"odd_tools_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "import asyncio, sys\n"
        "import pyarrow as pa\n"
        "async def add(a, b, noetl):\n"
        "    await asyncio.sleep(0)\n"
        "    return {'sum': a + b, 'step': noetl['step'], 'iteration': noetl['iteration']}\n"
        "async def raises():\n"
        "    raise KeyError('gone')\n"
        "def exits():\n"
        "    sys.exit('bye')\n"
        "def returns_object():\n"
        "    return object()\n"
        "def returns_table():\n"
        "    return pa.table({'x': [1, 2]})\n"
        "def returns_tuple():\n"
        "    return (1, 'a')\n"
        "def returns_coroutine():\n"
        "    return add(1, 2, {'step': 'c', 'iteration': None})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


async def test_python_awaits_coroutine_functions(tool_module: str) -> None:
    policy = Policy(python_allow=(tool_module,))
    tool = {"kind": "python", "call": f"{tool_module}:add", "args": {"a": 1, "b": 2}}
    assert await run_tool(tool, ctx(policy, iteration=4)) == {"sum": 3, "step": "s", "iteration": 4}
    assert await run_tool({"kind": "python", "call": f"{tool_module}:returns_coroutine"}, ctx(policy)) == {
        "sum": 3, "step": "c", "iteration": None,
    }  # fmt: skip
    error = await fails({"kind": "python", "call": f"{tool_module}:raises"}, ctx(policy))
    assert error.type == "KeyError" and "gone" in error.message


async def test_python_results_are_json_values_or_tables(tool_module: str) -> None:
    policy = Policy(python_allow=(tool_module,))
    assert msgspec.json.encode(await run_tool({"kind": "python", "call": f"{tool_module}:returns_tuple"}, ctx(policy))) == b'[1,"a"]'
    table = await run_tool({"kind": "python", "call": f"{tool_module}:returns_table"}, ctx(policy))
    assert isinstance(table, pa.Table) and table.column("x").to_pylist() == [1, 2]
    error = await fails({"kind": "python", "call": f"{tool_module}:returns_object"}, ctx(policy))
    assert error.type == "bad_result"


async def test_a_tool_calling_sys_exit_does_not_stop_the_worker(tool_module: str) -> None:
    error = await fails({"kind": "python", "call": f"{tool_module}:exits"}, ctx(Policy(python_allow=(tool_module,))))
    assert error.payload() == {"type": "SystemExit", "message": "bye"}


async def test_sync_tools_run_in_a_thread_so_the_loop_keeps_going(tmp_path: Path) -> None:
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    path = tmp_path / "out.txt"
    tool = {"kind": "python", "call": "examples.tools.effects:append_line", "args": {"path": str(path), "text": "hi", "delay": 0.3}}
    assert await run_tool(tool, ctx()) == "hi"
    running = False
    await task
    assert ticks > before + 1  # the loop ran while the tool slept
    assert path.read_text() == "hi\n"


async def test_the_runner_builds_the_context_from_the_command() -> None:
    command = Command(
        v=1, command_id=command_id("7", "flaky", None, 1), execution_id="7", tenant="acme", project="web",
        affinity="", step="flaky", iteration=None, attempt=1,
        tool={"kind": "python", "call": "examples.tools.flaky:fail_until", "args": {"attempt_needed": 2}},
    )  # fmt: skip
    runner = ToolRunner(EXAMPLES)
    with pytest.raises(ToolError, match="attempt 1 fails"):
        await runner(command, attempt=1)
    assert await runner(command, attempt=2) == 2


# --- http -------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        match self.path:
            case "/json":
                self._send(200, b'{"rows": [1, 2]}', "application/json; charset=utf-8", {"X-Trace": "t1"})
            case "/problem":
                self._send(200, b'{"ok": true}', "application/problem+json")
            case "/text":
                self._send(200, "héllo".encode(), "text/plain; charset=utf-8")
            case "/missing":
                self._send(404, b'{"detail": "no such thing"}', "application/json")
            case "/broken":
                self._send(200, b"{not json", "application/json")
            case "/redirect":
                self._send(302, b"", "text/plain", {"Location": "http://elsewhere.example/"})
            case "/slow":
                time.sleep(2)
                self._send(200, b"late", "text/plain")
            case _:
                self._send(500, b"unexpected path", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        echo = {"body": body.decode(), "content_type": self.headers.get("Content-Type"), "auth": self.headers.get("X-Auth")}
        self._send(201, json.dumps(echo).encode(), "application/json")


@pytest.fixture
def http_server() -> Iterator[str]:
    with serving(_Handler) as url:
        yield url


LOCAL = Policy(http_hosts=("127.0.0.1",))


async def test_http_get_returns_status_headers_and_parsed_json(http_server: str) -> None:
    result = await run_tool({"kind": "http", "url": f"{http_server}/json"}, ctx(LOCAL))
    assert result["status"] == 200 and result["body"] == {"rows": [1, 2]}
    assert result["headers"]["x-trace"] == "t1"
    assert (await run_tool({"kind": "http", "url": f"{http_server}/problem"}, ctx(LOCAL)))["body"] == {"ok": True}
    text = await run_tool({"kind": "http", "url": f"{http_server}/text"}, ctx(LOCAL))
    assert text["body"] == "héllo"


async def test_http_post_sends_json_or_text_bodies_and_headers(http_server: str) -> None:
    tool = {"kind": "http", "method": "POST", "url": f"{http_server}/echo", "headers": {"X-Auth": "k"}, "body": {"a": 1}}
    result = await run_tool(tool, ctx(LOCAL))
    assert result["status"] == 201
    assert json.loads(result["body"]["body"]) == {"a": 1} and result["body"]["content_type"] == "application/json"
    assert result["body"]["auth"] == "k"
    tool["body"] = "plain words"
    assert (await run_tool(tool, ctx(LOCAL)))["body"]["body"] == "plain words"


async def test_http_errors(http_server: str) -> None:
    status = await fails({"kind": "http", "url": f"{http_server}/missing"}, ctx(LOCAL))
    assert status.type == "http_status" and "answered 404" in status.message and "no such thing" in status.message
    broken = await fails({"kind": "http", "url": f"{http_server}/broken"}, ctx(LOCAL))
    assert broken.type == "http_invalid_json"
    slow = await fails({"kind": "http", "url": f"{http_server}/slow", "timeout": 0.2}, ctx(LOCAL))
    assert slow.type == "timeout"
    refused = await fails({"kind": "http", "url": "http://127.0.0.1:1/json"}, ctx(LOCAL))  # nothing listens on port 1
    assert refused.type == "http_error" and "ConnectError" in refused.message


async def test_http_redirects_are_not_followed(http_server: str) -> None:
    result = await run_tool({"kind": "http", "url": f"{http_server}/redirect"}, ctx(LOCAL))
    assert result["status"] == 302 and result["headers"]["location"] == "http://elsewhere.example/"


async def test_http_hosts_are_checked_against_the_policy_again(http_server: str) -> None:
    error = await fails({"kind": "http", "url": f"{http_server}/json"}, ctx(Policy(http_hosts=("api.example.com",))))
    assert error.type == "denied" and "'127.0.0.1'" in error.message and "api.example.com" in error.message
    assert (await fails({"kind": "http", "url": "ftp://127.0.0.1/x"}, ctx(LOCAL))).type == "invalid_tool"
