"""``noetl-edge cancel EXECUTION_ID``: ask the orchestrator to stop an execution.

It publishes ``execution.cancel_requested`` (id ``<execution>:cancel``, so asking
twice stores it once). No new command is issued after it; steps in flight
finish; the execution ends ``CANCELLED``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import msgspec
from nats.js.errors import NotFoundError

from edge.cli.options import connect_urls, resolve_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from kernel.producer import Producer
from locator.envelope import new_event
from locator.names import check_execution_id, check_name
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream


def run(args: argparse.Namespace) -> int:
    tenant, project = check_name("tenant", args.tenant), check_name("project", args.project)
    affinity = check_name("affinity", args.affinity, allow_empty=True)
    execution_id = check_execution_id(args.execution_id)
    topology = resolve_topology(args)

    async def main() -> int:
        nc = await connect(connect_urls(args, topology), name="noetl-cancel")
        try:
            js = nc.jetstream()
            shard = shard_for(tenant, project, affinity, topology.shard_count)
            try:
                await js.get_msg(wal_stream(shard), seq=1, next=True,
                                 subject=execution_filter(shard, tenant, project, execution_id))
            except NotFoundError:
                raise KernelError(f"unknown execution {execution_id} of {tenant}/{project}") from None
            env = new_event(
                tenant=tenant, project=project, affinity=affinity, execution_id=execution_id,
                type="execution.cancel_requested", event_id=f"{execution_id}:cancel", payload={"by": "cli"},
            )
            ack = await Producer(js, topology).publish(env)
            out = {"execution_id": execution_id, "seq": ack.seq, "duplicate": ack.duplicate, "status": "CANCEL_REQUESTED"}
            sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
            return 0
        finally:
            await close(nc)

    return asyncio.run(main())
