"""``noetl-edge result EXECUTION_ID STEP``: a step's result, inline or fetched by its ``result_ref``.

The projection comes from the warm cache (KV ``proj_<shard>``), or from a
snapshot it points to; a stored result is read from object storage
(``NOETL_OBJECTS_URL``, default ``file://<data-dir>/objects``). JSON goes to
stdout; ``--out FILE`` writes a stored result's Arrow IPC (Feather) file as is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import msgspec

from edge.cli.options import connect_urls, default_data_dir, resolve_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from locator.names import check_execution_id, check_name, check_step
from locator.shard import shard_for
from projector.cache import KvProjectionCache
from projector.errors import ProjectorError
from projector.replay import entry_projection
from projector.results import ResultStore
from projector.snapshots import SnapshotStore


def run(args: argparse.Namespace) -> int:
    tenant, project = check_name("tenant", args.tenant), check_name("project", args.project)
    affinity = check_name("affinity", args.affinity, allow_empty=True)
    execution_id = check_execution_id(args.execution_id)
    step = check_step(args.step)
    topology = resolve_topology(args)
    data_dir = args.data_dir or default_data_dir()

    async def main() -> int:
        nc = await connect(connect_urls(args, topology), name="noetl-result")
        try:
            shard = shard_for(tenant, project, affinity, topology.shard_count)
            cache = await KvProjectionCache.open(nc.jetstream(), shard)
            projection = await entry_projection(await cache.get(execution_id), SnapshotStore.from_env(data_dir=data_dir))
        finally:
            await close(nc)
        if projection is None or (projection.tenant, projection.project) != (tenant, project):
            raise KernelError(f"unknown execution {execution_id} of {tenant}/{project} (or not folded yet)")
        state = projection.steps.get(step)
        if state is None:
            raise KernelError(f"execution {execution_id} has no step {step!r}")
        out = {"execution_id": execution_id, "step": step, "status": state.status, "result_ref": state.result_ref}
        if state.result_ref is None:
            value = state.result
        else:
            results = ResultStore.from_env(data_dir=data_dir)
            try:
                if args.out:
                    Path(args.out).write_bytes(results.read_bytes(state.result_ref))
                    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes) from {state.result_ref}",
                          file=sys.stderr)
                    return 0
                value = results.get_json(state.result_ref)
            except ProjectorError as e:
                raise KernelError(str(e)) from e
        sys.stdout.write(msgspec.json.encode(out | {"result": value}).decode() + "\n")
        return 0

    return asyncio.run(main())
