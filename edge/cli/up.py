"""``noetl-edge up``: the embedded default, in the foreground, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import structlog

from edge.cli.options import UsageError, env_int, log_level, mirror_settings, stop_on_signals
from kernel.bootstrap import StreamSettings, bootstrap
from edge.auth import ensure_admin_token, load_tokens
from edge.cli.kernel import run_kernel
from edge.cli.upedge import edge_argv, start_child, stop_child
from edge.cli.upkernel import kernel_argv
from kernel.runtime import default_holder
from edge.serve import install_uvloop, wait_listening
from kernel.process import tune_gc
from kernel.connect import close, connect
from worker.worker import WorkerSettings, run_workers
from projector.results import ResultStore
from system_playbooks.orchestrate.catalog import policy_from_env
from system_playbooks.orchestrate.inline import inline_from_env
from worker.tools.runner import ToolRunner
from worker.tools.wasm_tool import WasmLimits
from projector.snapshots import SnapshotStore
from kernel.errors import ConfigError
from kernel.errors import ServerStartError
from worker.keychain import KeychainError, PlatformKey
from natscluster.server import EmbeddedServer, default_data_dir, free_port, port_in_use
from locator.topology import DEFAULT_SHARDS, default_topology

log = structlog.get_logger("noetl.cli.up")

SYNC_RE = re.compile(r"^(always|[0-9]+(ms|s|m|h))$")


def _check_shard_count(data_dir: Path, shards: int) -> None:
    # Changing the shard count re-routes existing executions: refuse rather than split histories.
    meta = data_dir / "noetl.json"
    if meta.exists():
        recorded = json.loads(meta.read_text(encoding="utf-8")).get("shard_count")
        if recorded != shards:
            raise ConfigError(
                f"{data_dir} was created with {recorded} shards; starting it with {shards} would re-route "
                f"existing executions (use --shards {recorded}, or a new --data-dir)"
            )


def _record_shard_count(data_dir: Path, shards: int) -> None:
    (data_dir / "noetl.json").write_text(json.dumps({"shard_count": shards}) + "\n", encoding="utf-8")


async def _serve(
    server: EmbeddedServer, settings: StreamSettings, snapshots: SnapshotStore, http: str, logging: tuple[str, str],
    kernels: int = 1,
) -> int:
    stop = stop_on_signals()
    # The edge in a process of its own: on one event loop with the kernel and the workers, a request waited
    # behind every fold and step of a busy kernel (docs/performance.md). Started first, so
    # that its imports overlap the bootstrap (its lifespan only connects; the ready line waits for both).
    edge = start_child(edge_argv(
        bind=http, data_dir=server.data_dir, nats_url=server.url, shards=server.topology.shard_count,
        log_level=logging[0], log_format=logging[1],
    ))  # fmt: skip
    edge_died: list[int] = []

    async def watch_edge() -> None:
        code = await asyncio.to_thread(edge.wait)
        if not stop.is_set():  # up without its edge is not up: stop everything, and say so
            edge_died.append(code)
            log.error("edge.exited", code=code)
            print(f"noetl-edge: error: the HTTP edge exited (code {code}); stopping", file=sys.stderr, flush=True)
            stop.set()

    edge_watch = asyncio.create_task(watch_edge())
    try:
        await _run(server, settings, snapshots, http, stop, kernels=kernels, logging=logging)
    finally:
        stop.set()
        await stop_child(edge)
        await edge_watch
    log.info("shutdown", reason="edge exited" if edge_died else "signal")
    return 1 if edge_died else 0


async def _run(
    server: EmbeddedServer, settings: StreamSettings, snapshots: SnapshotStore, http: str, stop: asyncio.Event,
    *, kernels: int = 1, logging: tuple[str, str] = ("info", "auto"),
) -> None:
    """Bootstrap, then the kernels and the worker pool until ``stop``; the ready line once the edge listens too."""
    nc = await connect([server.url], name="noetl-up")
    try:
        report = await bootstrap(nc.jetstream(), server.topology, settings=settings)
        log.info("bootstrap.done", created=len(report.created), unchanged=len(report.unchanged))
        _record_shard_count(server.data_dir, server.topology.shard_count)
    finally:
        await close(nc)
    # More kernels, each in a process of its own: the leases give each a fair share of the shards.
    holder = default_holder()
    children = [
        start_child(kernel_argv(
            index=i, holder=holder, nats_url=server.url, shards=server.topology.shard_count, data_dir=server.data_dir,
            log_level=logging[0], log_format=logging[1],
        ))  # fmt: skip
        for i in range(2, kernels + 1)
    ]

    async def watch_kernel(proc: subprocess.Popen[bytes]) -> None:
        code = await asyncio.to_thread(proc.wait)
        if not stop.is_set():  # its shards move to the kernels left once its leases expire
            log.error("kernel.exited", pid=proc.pid, code=code)
            print(f"noetl-edge: error: a kernel process exited (code {code}); the other kernels take over its shards",
                  file=sys.stderr, flush=True)  # fmt: skip

    watchers = [asyncio.create_task(watch_kernel(proc)) for proc in children]
    policy = policy_from_env(os.environ)
    results = ResultStore.from_env(data_dir=server.data_dir)
    # The worker pool: the same loop as `noetl-edge worker`, in this process.
    workers = asyncio.create_task(
        run_workers(
            [server.url], server.topology,
            runner=ToolRunner(policy, wasm_host=WasmLimits.from_env(os.environ).host(), data_dir=server.data_dir),
            results=results, stop=stop,
            concurrency=env_int("NOETL_WORKER_CONCURRENCY", 4),
        )
    )
    kernel_ready = asyncio.Event()

    async def announce() -> None:
        # One line, once both the kernel checked the topology and the edge accepts connections.
        await asyncio.gather(kernel_ready.wait(), wait_listening(http, timeout=60.0))
        print(f"ready {server.url} http://{http}", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await run_kernel(
            [server.url], server.topology, snapshots, cell=None, holder=holder, stop=stop, on_ready=kernel_ready.set
        )
    finally:
        stop.set()
        announcer.cancel()
        await asyncio.gather(*(stop_child(proc) for proc in children))
        await asyncio.gather(*watchers)
        await workers


def run(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir or default_data_dir()
    shards = args.shards if args.shards is not None else env_int("NOETL_SHARDS", DEFAULT_SHARDS)
    port = args.nats_port if args.nats_port is not None else env_int("NOETL_NATS_PORT", 4222)
    args.http_port = args.http_port if args.http_port is not None else env_int("NOETL_HTTP_PORT", 8080)
    settings = StreamSettings.from_env()
    # The worker pool's settings are checked now: a bad one must stop `up` before it says ready.
    WorkerSettings.from_env()
    WasmLimits.from_env(os.environ)
    policy_from_env(os.environ)  # NOETL_TOOL_KINDS names installed kinds, NOETL_NATS_SUBJECTS valid patterns
    inline_from_env(os.environ)  # NOETL_INLINE_STEPS, read by system/orchestrate
    mirror_settings()  # NOETL_EDGE_MIRROR_*, read by the edge child
    tune_gc()  # NOETL_GC_THRESHOLD, read by every process of up's
    kernels = args.kernels if args.kernels is not None else env_int("NOETL_UP_KERNELS", 1)
    if not 1 <= kernels <= shards:
        raise UsageError(f"--kernels must be between 1 and the shard count ({shards}), got {kernels}")
    if env_int("NOETL_WORKER_CONCURRENCY", 4) < 1:
        raise UsageError(f"NOETL_WORKER_CONCURRENCY must be at least 1, got {env_int('NOETL_WORKER_CONCURRENCY', 4)}")
    topology = default_topology(shard_count=shards)
    _check_shard_count(data_dir, shards)
    sync = os.environ.get("NOETL_NATS_SYNC") or None
    if sync is not None and not SYNC_RE.fullmatch(sync):
        raise UsageError(f"NOETL_NATS_SYNC must be 'always' or a duration such as '10s' or '2m', got {sync!r}")
    if args.http_port == 0:
        args.http_port = free_port(args.host)
    elif port_in_use(args.host, args.http_port):
        raise ServerStartError(f"HTTP port {args.host}:{args.http_port} is already in use; choose another with --http-port")
    if not load_tokens(data_dir=data_dir):
        path = ensure_admin_token(data_dir)
        print(f"noetl-edge: admin token for the HTTP API is in {path} (mode 0600)", file=sys.stderr, flush=True)
    try:
        keychain_key = PlatformKey.from_env(data_dir=data_dir, create=True)
    except KeychainError as e:
        raise UsageError(str(e)) from e
    if keychain_key.created:
        print(f"noetl-edge: platform key for the keychain is in {keychain_key.source} (mode 0600; keep a copy)", file=sys.stderr, flush=True)
    http = f"{args.host}:{args.http_port}"
    server = EmbeddedServer(
        data_dir=data_dir,
        topology=topology,
        host=args.host,
        port=port,
        max_payload=settings.server_max_payload,
        sync_interval=sync,
    )
    # SIGTERM before the loop installs its handlers must still stop the server cleanly.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.start()
        server.topology = topology.with_urls("local", (server.url,))
        install_uvloop()
        logging = (log_level(args, stderr_is_a_terminal=sys.stderr.isatty()), str(args.log_format))
        exit_code = asyncio.run(_serve(server, settings, SnapshotStore.from_env(data_dir=data_dir), http, logging, kernels))
    except KeyboardInterrupt:
        exit_code = 0
        log.info("shutdown", reason="interrupted")
    finally:
        code = server.stop()
        if code not in (0, None):
            print(f"noetl-edge: warning: nats-server exited with code {code}", file=sys.stderr)
    return exit_code
