"""``noetl-edge edge``: the HTTP edge alone (stateless: run as many as you like behind a load balancer)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from edge.app import check_cells, create_app
from edge.auth import load_tokens
from edge.cli.options import UsageError, add_topology_options, resolve_topology
from edge.serve import install_uvloop, serve, wait_listening
from kernel.errors import ServerStartError
from kernel.server import default_data_dir, port_in_use
from projector.snapshots import SnapshotStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "edge",
        help="serve the HTTP API (projections on demand, events, SSE, metrics) with Hypercorn",
        description="Serve the edge API on --bind until SIGINT/SIGTERM. Tokens come from NOETL_TOKENS_FILE, "
        "else <data-dir>/token (created by `noetl-edge up`); with neither, it refuses to start.",
    )
    p.add_argument("--bind", action="append", default=None, metavar="HOST:PORT", help="address to serve on (repeatable; default 127.0.0.1:8080)")
    p.add_argument("--data-dir", type=Path, default=None, help=f"where <data-dir>/token and the default object store are (default {default_data_dir()})")
    add_topology_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    data_dir = args.data_dir or default_data_dir()
    app = create_app(topology=topology, tokens=load_tokens(data_dir=data_dir), snapshots=SnapshotStore.from_env(data_dir=data_dir))
    bind = args.bind or ["127.0.0.1:8080"]
    for address in bind:
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not host:
            raise UsageError(f"--bind takes HOST:PORT, got {address!r}")
        if int(port) == 0:
            raise UsageError("--bind needs a fixed port (the edge announces the address it serves)")
        if port_in_use(host.strip("[]"), int(port)):
            raise ServerStartError(f"HTTP address {address} is already in use; choose another with --bind")
    install_uvloop()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await check_cells(app.state.edge.cells)  # fail with a clear error before serving
        server = asyncio.create_task(serve(app, bind, stop))
        listening = asyncio.create_task(wait_listening(bind[0]))
        await asyncio.wait([server, listening], return_when=asyncio.FIRST_COMPLETED)
        if listening.done() and listening.exception() is None:
            print(f"ready http://{bind[0]}", flush=True)
        await server

    asyncio.run(main())
    return 0
