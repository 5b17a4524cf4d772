"""``up``'s HTTP edge in a process of its own, so that folding and running steps never delay a request.

``noetl-edge up`` starts this module as its child (``python -m edge.cli.upedge``); it is not a command of
its own. The edge is built from the data directory exactly as ``up`` built it in process before (tokens,
snapshot and result stores, operator policy, the keychain's platform key) on ``up``'s topology, and served
by the same Hypercorn config until SIGTERM/SIGINT — or until ``up`` dies (the kernel asks for SIGTERM
then, as for the embedded nats-server), so a SIGKILLed ``up`` never leaves its HTTP port taken.

>>> from edge.cli.upedge import edge_argv
>>> edge_argv(bind="127.0.0.1:8080", data_dir=Path("/d"), nats_url="nats://127.0.0.1:4222", shards=4,
...           log_level="info", log_format="auto")[2:]
['edge.cli.upedge', '--bind', '127.0.0.1:8080', '--data-dir', '/d', '--nats-url', 'nats://127.0.0.1:4222', '--shards', '4', '--log-level', 'info', '--log-format', 'auto']
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("noetl.cli.upedge")


def edge_argv(*, bind: str, data_dir: Path, nats_url: str, shards: int, log_level: str, log_format: str) -> list[str]:
    """The command line ``up`` starts its edge with."""
    return [
        sys.executable, "-m", "edge.cli.upedge", "--bind", bind, "--data-dir", str(data_dir), "--nats-url", nats_url,
        "--shards", str(shards), "--log-level", log_level, "--log-format", log_format,
    ]  # fmt: skip


def start_child(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a child of ``up`` (its edge, its other kernels): it dies with this thread (Linux), stdout untouched."""
    from natscluster.server import _die_with_parent

    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


async def stop_child(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> int:
    """SIGTERM, wait for its graceful stop (Hypercorn's own grace is 5 s), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning("child.kill", pid=proc.pid, after_s=timeout)
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    return proc.returncode


def add_child_arguments(p: argparse.ArgumentParser) -> None:
    """What every child of ``up`` is told: up's data directory, server, shard count and logging."""
    p.add_argument("--data-dir", type=Path, required=True, help="up's data directory")
    p.add_argument("--nats-url", required=True, help="up's embedded nats-server")
    p.add_argument("--shards", type=int, required=True, help="up's shard count")
    p.add_argument("--log-level", default="info", help="log level (as up's)")
    p.add_argument("--log-format", default="auto", help="log format (as up's)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.cli.upedge", description="noetl-edge up's HTTP edge (started by up)")
    p.add_argument("--bind", required=True, help="HOST:PORT to serve on")
    add_child_arguments(p)
    args = p.parse_args(argv)

    from edge.app import create_app, keychain_key_from_env
    from edge.cli.options import mirror_settings, stop_on_signals
    from edge.auth import load_tokens
    from edge.serve import install_uvloop, serve
    from kernel.process import tune_gc
    from kernel.logs import configure_logging
    from locator.topology import default_topology
    from projector.results import ResultStore
    from projector.snapshots import SnapshotStore
    from system_playbooks.orchestrate.catalog import policy_from_env

    configure_logging(level=args.log_level, fmt=args.log_format)
    topology = default_topology(shard_count=args.shards).with_urls("local", (args.nats_url,))
    app = create_app(
        topology=topology,
        tokens=load_tokens(data_dir=args.data_dir),
        snapshots=SnapshotStore.from_env(data_dir=args.data_dir),
        policy=policy_from_env(os.environ),
        results=ResultStore.from_env(data_dir=args.data_dir),
        keychain_key=keychain_key_from_env(args.data_dir),
        mirror=mirror_settings(),
    )
    tune_gc()
    install_uvloop()

    async def run() -> None:
        stop = stop_on_signals()
        await serve(app, [args.bind], stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
