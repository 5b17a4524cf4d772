"""``noetl-edge worker``: a data worker in the foreground, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os

from edge.cli.options import connect_urls, default_data_dir, env_int, resolve_topology, stop_on_signals
from kernel.connect import install_uvloop
from kernel.process import tune_gc
from worker.worker import WorkerSettings, prepare_pool, run_workers
from locator.command import TIMER_POOL
from locator.errors import InvalidName
from locator.names import check_name
from locator.subjects import cmd_stream, pool_consumer
from projector.results import ResultStore
from system_playbooks.orchestrate.catalog import policy_from_env
from worker.tools.runner import ToolRunner
from worker.tools.wasm_tool import WasmLimits

DEFAULT_CONCURRENCY = 4


def run(args: argparse.Namespace) -> int:
    pool = check_name("pool", args.pool)
    if pool == TIMER_POOL:
        raise InvalidName(f"pool {TIMER_POOL!r} is reserved for the kernel's scheduler", field="pool")
    concurrency = args.concurrency if args.concurrency is not None else env_int("NOETL_WORKER_CONCURRENCY", DEFAULT_CONCURRENCY)
    topology = resolve_topology(args)
    data_dir = args.data_dir or default_data_dir()
    results = ResultStore.from_env(data_dir=data_dir)
    # The keychain key (for steps that reference credentials): NOETL_KEYCHAIN_KEY(_FILE) or <data_dir>/keychain.key.
    runner = ToolRunner(policy_from_env(os.environ), wasm_host=WasmLimits.from_env(os.environ).host(), data_dir=data_dir)

    if args.prepare:
        settings = WorkerSettings.from_env()  # a bad setting stops here, before NATS
        shards = asyncio.run(prepare_pool(connect_urls(args, topology), topology, pool=pool, settings=settings))
        print(f"prepared pool {pool}: consumer {pool_consumer(pool)} on {cmd_stream(shards[0])}..{cmd_stream(shards[-1])}")
        return 0

    async def main() -> None:
        stop = stop_on_signals()
        await run_workers(
            connect_urls(args, topology), topology, runner=runner, results=results, stop=stop, pool=pool,
            concurrency=concurrency,
        )

    tune_gc()
    install_uvloop()
    asyncio.run(main())
    return 0
