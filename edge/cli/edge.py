"""``noetl-edge edge``: the HTTP edge alone (stateless: run as many as you like behind a load balancer)."""

from __future__ import annotations

import argparse
import asyncio
import os

from edge.app import check_cells, create_app
from edge.auth import load_tokens
from edge.cli.options import UsageError, mirror_settings, resolve_topology, stop_on_signals
from edge.serve import install_uvloop, serve, wait_listening
from kernel.process import tune_gc
from kernel.errors import ServerStartError
from natscluster.server import default_data_dir, port_in_use
from projector.results import ResultStore
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.catalog import policy_from_env


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    data_dir = args.data_dir or default_data_dir()
    app = create_app(
        topology=topology,
        tokens=load_tokens(data_dir=data_dir),
        snapshots=SnapshotStore.from_env(data_dir=data_dir),
        policy=policy_from_env(os.environ),
        results=ResultStore.from_env(data_dir=data_dir),
        mirror=mirror_settings(),
    )
    bind = args.bind or ["127.0.0.1:8080"]
    for address in bind:
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not host:
            raise UsageError(f"--bind takes HOST:PORT, got {address!r}")
        if int(port) == 0:
            raise UsageError("--bind needs a fixed port (the edge announces the address it serves)")
        if port_in_use(host.strip("[]"), int(port)):
            raise ServerStartError(f"HTTP address {address} is already in use; choose another with --bind")
    tune_gc()
    install_uvloop()

    async def main() -> None:
        stop = stop_on_signals()
        await check_cells(app.state.edge.cells)  # fail with a clear error before serving
        server = asyncio.create_task(serve(app, bind, stop))
        listening = asyncio.create_task(wait_listening(bind[0]))
        await asyncio.wait([server, listening], return_when=asyncio.FIRST_COMPLETED)
        if listening.done() and listening.exception() is None:
            print(f"ready http://{bind[0]}", flush=True)
        await server

    asyncio.run(main())
    return 0
