"""``noetl-edge executions list``: a project's executions, newest first, straight over NATS and the object store.

The same listing as ``GET …/executions`` (:func:`projector.listing.list_page`): filters are checked before
connecting (a bad one exits 2 with one line), pages follow the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from edge.cli.options import UsageError, connect_urls, objects_root, resolve_topology
from edge.cli.output import EXIT_OK, print_json
from edge.listfilters import BadFilter, build_query
from kernel.bootstrap import check_topology
from kernel.connect import close, connect
from locator.names import check_name
from projector.archiveindex import ArchiveIndex
from projector.listing import BadPageToken, Cursor, decode_token, encode_token, list_page
from projector.visibility import ExecutionSummary, VisibilityIndex


def _table(rows: list[ExecutionSummary], token: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None)
    for name in ("execution", "status", "playbook", "created", "updated", "ended", "steps", "last seq"):
        table.add_column(name, justify="right" if name == "last seq" else "left")
    for r in rows:
        playbook = "-" if r.playbook is None else f"{r.playbook.path}@{r.playbook.version}"
        steps = " ".join(f"{k.lower()} {v}" for k, v in r.steps.items()) or "-"
        table.add_row(r.execution_id + (f" ({r.affinity})" if r.affinity else ""), r.status, playbook, r.created_at,
                      r.updated_at, r.ended_at or "-", steps, str(r.last_seq))  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} execution(s)" + (f"; more: --page-token {token}" if token else ""))


def run(args: argparse.Namespace) -> int:
    tenant, project = check_name("tenant", args.tenant), check_name("project", args.project)
    try:
        query = build_query(tenant, project, statuses=args.status, playbook=args.playbook, since=args.since,
                            until=args.until, limit=args.limit)  # fmt: skip
        cursor: Cursor | None = None if not args.page_token else decode_token(args.page_token, query)
    except BadFilter as e:
        raise UsageError(f"--{e.field.replace('_', '-')}: {e}") from None
    except BadPageToken as e:
        raise UsageError(f"--page-token: {e}") from None
    topology = resolve_topology(args)
    root = objects_root(args)

    async def main() -> int:
        nc = await connect(connect_urls(args, topology), name="noetl-executions")
        try:
            js = nc.jetstream()
            await check_topology(js, topology)

            async def source(shard: int) -> tuple[VisibilityIndex, ArchiveIndex]:
                return VisibilityIndex(js, shard), ArchiveIndex(js, shard, root)

            rows: list[ExecutionSummary] = []
            after = cursor
            while True:
                page, after = await list_page(source, range(topology.shard_count), query, after)
                rows += page
                if after is None or not args.all:
                    break
        finally:
            await close(nc)
        token = None if after is None else encode_token(after, query)
        if args.json or not sys.stdout.isatty():
            print_json({"executions": rows, "next_page_token": token})
        else:
            _table(rows, token)
        return EXIT_OK

    return asyncio.run(main())
