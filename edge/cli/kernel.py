"""``noetl-edge kernel``: a kernel alone (pump + system playbooks) against a given NATS and topology."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import structlog

from edge.cli.options import add_topology_options, connect_urls, resolve_topology
from kernel.bootstrap import StreamSettings
from kernel.connect import close, connect
from kernel.runtime import Kernel, default_holder
from kernel.server import default_data_dir
from locator.topology import Topology
from projector.snapshots import SnapshotStore

log = structlog.get_logger("noetl.cli.kernel")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "kernel",
        help="run a kernel (fold and materialize the shards it leases) against a NATS server",
        description="Connect to NATS, take leases on a fair share of the cell's shards and fold them "
        "(system/project) and write Feather snapshots (system/materialize) until SIGINT/SIGTERM. "
        "Run several: they share the shards and take over each other's within the lease TTL.",
    )
    p.add_argument("--cell", default=None, help="the cell whose shards to fold (default: the topology's first)")
    p.add_argument("--holder", default=None, help=f"lease holder id (default host-pid, e.g. {default_holder()})")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"base of the default file:// object store (env NOETL_DATA_DIR; default {default_data_dir()}); "
        "NOETL_OBJECTS_URL overrides the object store, e.g. s3://bucket/prefix",
    )
    add_topology_options(p)
    p.set_defaults(func=run)


async def run_kernel(
    urls: list[str],
    topology: Topology,
    snapshots: SnapshotStore,
    *,
    cell: str | None,
    holder: str | None,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
) -> None:
    nc = await connect(urls, name=f"noetl-kernel-{holder or default_holder()}")
    try:
        kernel = Kernel(
            nc, topology=topology, snapshots=snapshots, settings=StreamSettings.from_env(), cell=cell, holder=holder
        )
        await kernel.run(stop, on_ready=on_ready)
    finally:
        await close(nc)


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    snapshots = SnapshotStore.from_env(data_dir=args.data_dir or default_data_dir())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        urls = connect_urls(args, topology)
        await run_kernel(
            urls, topology, snapshots, cell=args.cell, holder=args.holder, stop=stop,
            on_ready=lambda: print(f"ready kernel {args.holder or default_holder()} {urls[0]}", flush=True),
        )

    asyncio.run(main())
    return 0
