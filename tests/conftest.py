"""Fixture chain for real NATS: store dir -> nats-server -> client -> JetStream -> bootstrapped topology."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kernel.bootstrap import bootstrap
from kernel.connect import close, connect
from kernel.logs import configure_logging
from natscluster.server import EmbeddedServer
from locator.topology import Topology, default_topology


def pytest_configure(config: pytest.Config) -> None:
    # Library logs go to stderr (never stdout, which carries command output).
    configure_logging(level="info", fmt="console")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Slow tests first: the parallel workers then finish together instead of waiting on one long tail.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the installed ``noetl-edge`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    env["NOETL_HTTP_PORT"] = "0"  # several `up` processes may run at once: never fight over 8080
    env.update(extra)
    return env


def cli_path() -> str:
    return str(Path(sys.executable).parent / "noetl-edge")


@pytest.fixture
def shard_count() -> int:
    return 4


@pytest.fixture
def topology(shard_count: int) -> Topology:
    return default_topology(shard_count=shard_count)


@pytest.fixture
def nats_server(tmp_path: Path, topology: Topology) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(data_dir=tmp_path / "data", topology=topology, port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedServer) -> AsyncIterator[NATS]:
    client = await connect([nats_server.url], name="pytest")
    try:
        yield client
    finally:
        await close(client)


@pytest.fixture
async def js(nc: NATS, topology: Topology) -> JetStreamContext:
    context = nc.jetstream()
    await bootstrap(context, topology)
    return context


async def stream_messages(js: JetStreamContext, stream: str) -> list[tuple[int, str, str | None, bytes]]:
    """Every message of ``stream`` as (seq, subject, Nats-Msg-Id, data), read with direct gets."""
    info = await js.stream_info(stream)
    out: list[tuple[int, str, str | None, bytes]] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((seq, msg.subject, (msg.headers or {}).get("Nats-Msg-Id"), msg.data or b""))
    return out


async def subject_messages(js: JetStreamContext, stream: str, subject: str) -> AsyncIterator[tuple[int, bytes]]:
    """(seq, data) of every message of ``stream`` on ``subject`` (wildcards allowed), in order, by direct gets."""
    seq = 0
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq + 1, next=True, subject=subject)
        except NotFoundError:
            return
        assert msg.seq is not None
        seq = msg.seq
        yield seq, msg.data or b""


async def wal_counts(js: JetStreamContext, shard_count: int) -> list[int]:
    return [(await js.stream_info(f"WAL_{n}")).state.messages for n in range(shard_count)]


@pytest.fixture
def read_stream() -> object:
    return stream_messages


@pytest.fixture
def count_wal() -> object:
    return wal_counts


@pytest.fixture
def cli() -> object:
    """Run the installed ``noetl-edge`` as a user would; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, check: bool = True, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [cli_path(), *args], capture_output=True, text=True, env=env or cli_env(), input=stdin, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"noetl-edge {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    return run


@pytest.fixture
def cli_command() -> list[str]:
    return [cli_path()]


@pytest.fixture
def cli_environ() -> dict[str, str]:
    return cli_env()


S3_BUCKET = "noetl-test"
S3_CREDENTIALS = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server mode) with bucket ``noetl-test``; tests use unique prefixes."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # No region here: s3fs.mkdir sends it as LocationConstraint, and S3 rejects "us-east-1" there.
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir(S3_BUCKET)
        yield endpoint
    finally:
        server.stop()


async def _pump_until(pumps: list[Any], done: Any, timeout: float = 60.0) -> None:
    """Run ``pumps`` (kernel.pump.Pump) until ``await done()`` is true, bounded by ``timeout``."""
    import asyncio

    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in pumps]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await done():
            for t in tasks:
                if t.done():
                    t.result()  # a pump that died: raise its error here
            assert asyncio.get_running_loop().time() < deadline, "pumps did not get there in time"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


@pytest.fixture
def pump_until() -> object:
    return _pump_until


_SPAN_EXPORTER: Any = None


@pytest.fixture
def spans() -> Any:
    """An in-memory span exporter behind the one global TracerProvider (installed once per session)."""
    global _SPAN_EXPORTER
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if _SPAN_EXPORTER is None:
        _SPAN_EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
        trace.set_tracer_provider(provider)
    _SPAN_EXPORTER.clear()
    return _SPAN_EXPORTER
