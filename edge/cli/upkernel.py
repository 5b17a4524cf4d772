"""``up``'s extra kernels, each a process of its own, so that folding uses more than one core.

``noetl-edge up --kernels N`` runs one kernel in its own process (beside the workers) and starts N-1 more
as children (``python -m edge.cli.upkernel``); it is not a command of its own. They are ordinary kernels:
the shard leases share the shards between all of them (a fair share each, handed over within a lease
renewal), and every projection write is fenced on its KV revision, so a shard moving between them loses
or doubles nothing. A child dies with ``up`` (as the edge child and the embedded nats-server do); a child
that exits on its own is reported, and its shards move to the kernels left once its leases expire.

>>> from edge.cli.upkernel import kernel_argv
>>> kernel_argv(index=2, holder="up-host-7", nats_url="nats://127.0.0.1:4222", shards=4, data_dir=Path("/d"),
...             log_level="info", log_format="auto")[2:]
['edge.cli.upkernel', '--holder', 'up-host-7-k2', '--nats-url', 'nats://127.0.0.1:4222', '--shards', '4', '--data-dir', '/d', '--log-level', 'info', '--log-format', 'auto']
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from edge.cli.upedge import add_child_arguments


def kernel_argv(
    *, index: int, holder: str, nats_url: str, shards: int, data_dir: Path, log_level: str, log_format: str
) -> list[str]:
    """The command line ``up`` starts its ``index``-th kernel (2, 3, …) with."""
    return [
        sys.executable, "-m", "edge.cli.upkernel", "--holder", f"{holder}-k{index}", "--nats-url", nats_url,
        "--shards", str(shards), "--data-dir", str(data_dir), "--log-level", log_level, "--log-format", log_format,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.cli.upkernel", description="one of noetl-edge up's kernels (started by up)")
    p.add_argument("--holder", required=True, help="lease holder id")
    add_child_arguments(p)
    args = p.parse_args(argv)

    from edge.cli.kernel import run_kernel
    from edge.cli.options import stop_on_signals
    from kernel.connect import install_uvloop
    from kernel.process import tune_gc
    from kernel.logs import configure_logging
    from locator.topology import default_topology
    from projector.snapshots import SnapshotStore

    configure_logging(level=args.log_level, fmt=args.log_format)
    topology = default_topology(shard_count=args.shards).with_urls("local", (args.nats_url,))
    snapshots = SnapshotStore.from_env(data_dir=args.data_dir)
    tune_gc()
    install_uvloop()

    async def run() -> None:
        stop = stop_on_signals()
        await run_kernel([args.nats_url], topology, snapshots, cell=None, holder=args.holder, stop=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
