"""``noetl-edge up``: the embedded default, in the foreground, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import structlog

from edge.cli.options import UsageError, env_int
from kernel.bootstrap import StreamSettings, bootstrap
from edge.app import create_app
from edge.auth import TokenSpec, ensure_admin_token, load_tokens
from edge.cli.kernel import run_kernel
from edge.serve import install_uvloop, serve, wait_listening
from kernel.connect import close, connect
from kernel.worker import WorkerSettings, run_workers
from projector.results import ResultStore
from system_playbooks.orchestrate.catalog import policy_from_env
from system_playbooks.orchestrate.tools import ToolRunner
from system_playbooks.orchestrate.wasm_tool import WasmLimits
from projector.snapshots import SnapshotStore
from kernel.errors import ConfigError
from kernel.errors import ServerStartError
from kernel.keychain import KeychainError, PlatformKey
from kernel.server import EmbeddedServer, default_data_dir, free_port, port_in_use
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
    server: EmbeddedServer, settings: StreamSettings, snapshots: SnapshotStore, http: str, tokens: list[TokenSpec],
    keychain_key: PlatformKey,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect([server.url], name="noetl-up")
    try:
        report = await bootstrap(nc.jetstream(), server.topology, settings=settings)
        log.info("bootstrap.done", created=len(report.created), unchanged=len(report.unchanged))
        _record_shard_count(server.data_dir, server.topology.shard_count)
    finally:
        await close(nc)
    policy = policy_from_env(os.environ)
    results = ResultStore.from_env(data_dir=server.data_dir)
    app = create_app(
        topology=server.topology, tokens=tokens, snapshots=snapshots, policy=policy, results=results, keychain_key=keychain_key
    )
    edge = asyncio.create_task(serve(app, [http], stop))
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
        await asyncio.gather(kernel_ready.wait(), wait_listening(http))
        print(f"ready {server.url} http://{http}", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await run_kernel(
            [server.url], server.topology, snapshots, cell=None, holder=None, stop=stop, on_ready=kernel_ready.set
        )
    finally:
        stop.set()
        announcer.cancel()
        await edge
        await workers
    log.info("shutdown", reason="signal")


def run(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir or default_data_dir()
    shards = args.shards if args.shards is not None else env_int("NOETL_SHARDS", DEFAULT_SHARDS)
    port = args.nats_port if args.nats_port is not None else env_int("NOETL_NATS_PORT", 4222)
    args.http_port = args.http_port if args.http_port is not None else env_int("NOETL_HTTP_PORT", 8080)
    settings = StreamSettings.from_env()
    # The worker pool's settings are checked now: a bad one must stop `up` before it says ready.
    WorkerSettings.from_env()
    WasmLimits.from_env(os.environ)
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
    tokens = load_tokens(data_dir=data_dir)
    if not tokens:
        path = ensure_admin_token(data_dir)
        tokens = load_tokens(data_dir=data_dir)
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
        asyncio.run(_serve(server, settings, SnapshotStore.from_env(data_dir=data_dir), http, tokens, keychain_key))
    except KeyboardInterrupt:
        log.info("shutdown", reason="interrupted")
    finally:
        code = server.stop()
        if code not in (0, None):
            print(f"noetl-edge: warning: nats-server exited with code {code}", file=sys.stderr)
    return 0
