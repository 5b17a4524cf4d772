"""``noetl-edge locate``: where a tenant/project/affinity lives (pure, no I/O)."""

from __future__ import annotations

import argparse
import sys

import msgspec

from edge.cli.options import add_topology_options, resolve_topology


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "locate",
        help="print the shard, cell, subject prefix and stream of a tenant/project",
        description="Compute where (tenant, project, affinity) lives with the FNV-1a locator. "
        "Prints one JSON object; events of an execution go to <subject_prefix>.<execution_id>.<type>.",
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--affinity", default="", help="optional affinity key (default empty)")
    add_topology_options(p, with_url=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    location = topology.locate(args.tenant, args.project, args.affinity)
    sys.stdout.write(msgspec.json.encode(location).decode() + "\n")
    return 0
