"""The ``noetl-edge`` command line: one small module per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge.cli import edge, kernel, locate, playbook, publish, up
from edge.cli.options import UsageError, add_log_options
from kernel.errors import ConfigError, KernelError
from kernel.logs import configure_logging
from locator.errors import LocatorError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noetl-edge",
        description="noetl-edge: a pure event-sourced edge runtime on NATS JetStream. "
        "Exit codes: 0 ok, 1 runtime failure, 2 usage or validation error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (up, kernel, edge, publish, locate, playbook):
        module.register(sub)
    for p in sub.choices.values():
        add_log_options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(level=args.log_level, fmt=args.log_format)
    except ValueError as e:
        print(f"noetl-edge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except (LocatorError, UsageError, ConfigError) as e:
        print(f"noetl-edge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KernelError as e:
        print(f"noetl-edge: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
