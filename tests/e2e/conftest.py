"""End-to-end fixtures: real ``noetl-edge`` processes (``up``, ``kernel``, ``worker``, ``run``…) and the core invariant.

A test gets a running stack either from :func:`stack` (one ``noetl-edge up`` per
module: NATS, kernel, worker pool and edge in one process; tests that kill
nothing share it, each under its own tenant/project) or builds one from
separate processes (``nats_server`` + :class:`Proc` kernels and workers) when it
kills one of them.

:func:`check_invariant` is the check every test that ends an execution makes:
the projection the edge serves equals a fresh fold of the execution's WAL,
byte for byte after canonical encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kernel.connect import close, connect
from locator.envelope import Envelope
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream
from projector.fold import WalEvent, fold
from projector.projection import Projection, canonical, decode_projection
from projector.replay import history
from tests.conftest import cli_env, cli_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "playbooks"
SHARDS = 4
TERMINAL_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})


def e2e_env(**extra: str) -> dict[str, str]:
    """The CLI environment plus what the example tools need: the repo on the path and the policy allowing them."""
    return cli_env(PYTHONPATH=str(REPO), NOETL_PYTHON_ALLOW="examples.tools.", **extra)


def executions_url(tenant: str, project: str, execution_id: str = "") -> str:
    base = f"/api/v1/tenants/{tenant}/projects/{project}/executions"
    return f"{base}/{execution_id}" if execution_id else base


# --------------------------------------------------------------------------- processes


class Proc:
    """A ``noetl-edge`` subprocess whose stderr goes to a file (shown when a test fails)."""

    def __init__(self, args: list[str], *, env: dict[str, str], logs: Path, name: str) -> None:
        self.name = name
        self.log_path = logs / f"{name}.stderr"
        with open(self.log_path, "w", encoding="utf-8") as err:
            self.proc = subprocess.Popen([cli_path(), *args], stdout=subprocess.PIPE, stderr=err, env=env, text=True)

    def ready_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first stdout line (it must start with ``prefix``), read in a thread so a hang fails the test."""
        stdout = self.proc.stdout
        assert stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result[0] if result else ""
        if not line.startswith(prefix):
            self.kill()
            raise AssertionError(f"{self.name} did not say {prefix!r} within {timeout}s (said {line!r}):\n{self.logs()}")
        return line.strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap (no clean shutdown of anything); safe to call twice."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def logs(self, lines: int = 60) -> str:
        try:
            tail = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return f"({self.name}: no stderr file)"
        return f"--- {self.name} stderr (last {len(tail)} lines) ---\n" + "\n".join(tail)


@dataclass
class RunResult:
    """``noetl-edge run`` as a user sees it: the exit code, the start line, progress lines and the final projection."""

    returncode: int
    started: dict[str, Any]
    lines: list[str]
    projection: dict[str, Any] | None
    stderr: str

    @property
    def execution_id(self) -> str:
        return str(self.started["execution_id"])


@dataclass
class Stack:
    """One ``noetl-edge up`` process: its NATS and HTTP URLs, admin token and data dir."""

    proc: Proc
    nats_url: str
    http_url: str
    token: str
    data_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return e2e_env(NOETL_DATA_DIR=str(self.data_dir), **extra)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``noetl-edge ARGS --nats-url <this stack>``."""
        proc = subprocess.run(
            [cli_path(), *args, "--nats-url", self.nats_url], capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"noetl-edge {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}\n{self.proc.logs()}")
        return proc

    def run(
        self, playbook: Path | str, tenant: str, project: str, *, workload: dict[str, Any] | None = None,
        wait: bool = True, timeout: float = 60,
    ) -> RunResult:
        """``noetl-edge run PLAYBOOK [--workload JSON] [--wait]``, parsed."""
        args = ["run", str(playbook), "--tenant", tenant, "--project", project]
        if workload is not None:
            args += ["--workload", json.dumps(workload)]
        if wait:
            args += ["--wait", "--timeout", str(timeout)]
        proc = self.cli(*args, check=False, timeout=timeout + 30)
        out = proc.stdout.splitlines()
        assert out, f"noetl-edge run printed nothing (exit {proc.returncode}):\n{proc.stderr}"
        started = json.loads(out[0])
        projection = json.loads(out[-1]) if wait and len(out) > 1 and out[-1].startswith("{") else None
        return RunResult(proc.returncode, started, out[1:-1] if projection else out[1:], projection, proc.stderr)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


def start_up(
    data_dir: Path, logs: Path, *, env: dict[str, str] | None = None, name: str = "up", timeout: float = 60
) -> Stack:
    """``noetl-edge up`` on ``data_dir`` with any free ports, once it said ready (``env``: the whole environment)."""
    if env is None:
        env = e2e_env(NOETL_DATA_DIR=str(data_dir), NOETL_NATS_PORT="0", NOETL_HTTP_PORT="0")
    proc = Proc(["up"], env=env, logs=logs, name=name)
    line = proc.ready_line("ready ", timeout=timeout)
    _, nats_url, http_url = line.split()
    token = (data_dir / "token").read_text(encoding="utf-8").strip()
    return Stack(proc=proc, nats_url=nats_url, http_url=http_url, token=token, data_dir=data_dir)


@contextlib.contextmanager
def up_stack(
    data_dir: Path, logs: Path, *, env: dict[str, str] | None = None, name: str = "up", timeout: float = 60
) -> Iterator[Stack]:
    """:func:`start_up` for the ``with`` block; afterwards ``up`` must stop cleanly (exit 0)."""
    running = start_up(data_dir, logs, env=env, name=name, timeout=timeout)
    try:
        yield running
    finally:
        code = running.proc.stop()
        assert code == 0, f"noetl-edge up exited {code}:\n{running.proc.logs()}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``noetl-edge up`` shared by the tests of a module (each uses its own tenant/project)."""
    base = tmp_path_factory.mktemp("up")
    with up_stack(base / "data", base) as running:
        yield running


@contextlib.asynccontextmanager
async def jetstream_of(stack: Stack, *, name: str = "pytest-e2e") -> AsyncIterator[JetStreamContext]:
    """A JetStream context on ``stack``'s nats-server (a connection of its own, closed after)."""
    nc: NATS = await connect([stack.nats_url], name=name)
    try:
        yield nc.jetstream()
    finally:
        await close(nc)


@pytest.fixture
async def stack_js(stack: Stack) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the module's stack, for reading the WAL."""
    async with jetstream_of(stack) as js:
        yield js


@pytest.fixture
async def edge(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the stack's edge, with the admin token."""
    async with stack.client() as client:
        yield client


# --------------------------------------------------------------------------- the WAL


async def wal_events(
    js: JetStreamContext, tenant: str, project: str, execution_id: str, *, until_seq: int | None = None
) -> list[WalEvent]:
    """The execution's whole history in WAL order (poison skipped, as the fold skips it)."""
    shard = shard_for(tenant, project, "", SHARDS)
    events = history(
        js, shard=shard, shard_count=SHARDS, tenant=tenant, project=project, execution_id=execution_id,
        until_seq=until_seq,
    )
    return [e async for e in events]


async def raw_messages(js: JetStreamContext, tenant: str, project: str, execution_id: str, type: str) -> list[bytes]:
    """The stored bytes of every WAL message of the execution with event type ``type``."""
    shard = shard_for(tenant, project, "", SHARDS)
    subject = execution_filter(shard, tenant, project, execution_id)[:-1] + type
    out: list[bytes] = []
    seq = 0
    while True:
        try:
            msg = await js.get_msg(wal_stream(shard), seq=seq + 1, next=True, subject=subject)
        except NotFoundError:
            return out
        assert msg.seq is not None
        seq = msg.seq
        out.append(msg.data or b"")


async def wait_for_wal(
    js: JetStreamContext, tenant: str, project: str, execution_id: str,
    until: Callable[[list[Envelope]], bool], *, timeout: float = 60.0, why: Callable[[], str] = lambda: "",
) -> list[WalEvent]:
    """Poll the execution's WAL until ``until(envelopes)`` holds; the events at that point."""
    deadline = time.monotonic() + timeout
    events: list[WalEvent] = []
    while time.monotonic() < deadline:
        events = await wal_events(js, tenant, project, execution_id)
        if until([e.env for e in events]):
            return events
        await asyncio.sleep(0.05)
    seen = [(e.seq, e.env.type, e.env.step, e.env.attempt) for e in events]
    raise AssertionError(f"execution {execution_id}: condition not met within {timeout}s; WAL: {seen}\n{why()}")


def has(type: str, count: int = 1, *, step: str | None = None) -> Callable[[list[Envelope]], bool]:
    return lambda envs: sum(e.type == type and (step is None or e.step == step) for e in envs) >= count


def ended(envs: list[Envelope]) -> bool:
    return any(e.type in TERMINAL_EVENTS for e in envs)


# --------------------------------------------------------------------------- the core invariant


async def folded_and_materialized(js: JetStreamContext, shard: int, timeout: float = 60.0) -> None:
    """Until ``system/project`` and ``system/materialize`` have handled everything on ``shard``, twice in a row
    (materialize's own pointer writes come back to its consumer)."""
    from kernel.host import consumer_stream

    deadline = asyncio.get_running_loop().time() + timeout
    quiet = 0
    while quiet < 2:
        assert asyncio.get_running_loop().time() < deadline, f"shard {shard}'s kernel consumers still busy after {timeout}s"
        busy = False
        for name in ("project", "materialize"):
            info = await js.consumer_info(consumer_stream(name, shard), f"{name}_{shard}")
            busy = busy or bool(info.num_pending or info.num_ack_pending)
        quiet = 0 if busy else quiet + 1
        await asyncio.sleep(0.2)


async def check_invariant(js: JetStreamContext, edge: httpx.AsyncClient, tenant: str, project: str, execution_id: str) -> Projection:
    """The edge's projection (read with ``min_seq`` = the WAL's newest event) equals a fresh fold of the WAL."""
    events = await wal_events(js, tenant, project, execution_id)
    assert events, f"execution {execution_id} has no events"
    resp = await edge.get(executions_url(tenant, project, execution_id), params={"min_seq": events[-1].seq})
    assert resp.status_code == 200, resp.text
    served = decode_projection(resp.content)
    # The served projection is at least as new as what was read; fold exactly the events it covers.
    fresh = fold(None, await wal_events(js, tenant, project, execution_id, until_seq=served.last_seq))
    assert fresh is not None
    assert canonical(served) == canonical(fresh)
    return served

