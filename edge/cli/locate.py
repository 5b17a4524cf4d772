"""``noetl-edge locate``: where a tenant/project/affinity lives (pure, no I/O)."""

from __future__ import annotations

import argparse
import sys

import msgspec

from edge.cli.options import resolve_topology


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    location = topology.locate(args.tenant, args.project, args.affinity)
    sys.stdout.write(msgspec.json.encode(location).decode() + "\n")
    return 0
