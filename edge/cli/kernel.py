"""``noetl-edge kernel``: a kernel alone (pump + system playbooks) against a given NATS and topology."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Sequence

import structlog

from edge.cli.options import UsageError, connect_urls, resolve_topology, stop_on_signals
from kernel.bootstrap import StreamSettings
from kernel.connect import close, connect, install_uvloop
from kernel.process import tune_gc
from kernel.host import SYSTEM_PLUGINS, system_manifests
from kernel.runtime import Kernel, default_holder
from natscluster.server import default_data_dir
from locator.topology import Topology
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.catalog import policy_from_env
from system_playbooks.orchestrate.inline import inline_from_env

log = structlog.get_logger("noetl.cli.kernel")


async def run_kernel(
    urls: list[str],
    topology: Topology,
    snapshots: SnapshotStore,
    *,
    cell: str | None,
    holder: str | None,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    plugins: Sequence[str] | None = None,
) -> None:
    nc = await connect(urls, name=f"noetl-kernel-{holder or default_holder()}")
    try:
        kernel = Kernel(
            nc, topology=topology, snapshots=snapshots, settings=StreamSettings.from_env(), cell=cell, holder=holder,
            manifests=None if plugins is None else system_manifests(plugins),
        )
        await kernel.run(stop, on_ready=on_ready)
    finally:
        await close(nc)


def _plugins(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SYSTEM_PLUGINS))
    if not names or unknown:
        raise UsageError(f"--plugins takes a comma-separated subset of {', '.join(SYSTEM_PLUGINS)}, got {text!r}")
    return [n for n in SYSTEM_PLUGINS if n in names]  # in the order the pumps start


def run(args: argparse.Namespace) -> int:
    plugins = _plugins(args.plugins)
    # The orchestrator decodes and renders every allowed tool kind: refuse to start when NOETL_TOOL_KINDS names
    # one not installed here, as the edge and the workers do (one clear line, exit 2).
    policy_from_env(os.environ)
    inline_from_env(os.environ)  # NOETL_INLINE_STEPS, read by system/orchestrate
    topology = resolve_topology(args)
    snapshots = SnapshotStore.from_env(data_dir=args.data_dir or default_data_dir())

    async def main() -> None:
        stop = stop_on_signals()
        urls = connect_urls(args, topology)
        await run_kernel(
            urls, topology, snapshots, cell=args.cell, holder=args.holder, stop=stop,
            plugins=plugins,
            on_ready=lambda: print(f"ready kernel {args.holder or default_holder()} {urls[0]}", flush=True),
        )

    tune_gc()
    install_uvloop()
    asyncio.run(main())
    return 0
