"""The ``noetl-edge`` command line: one small module per command, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from edge.cli.output import EXIT_RUNTIME, EXIT_USAGE
from edge.cli.options import UsageError, log_level
from edge.cli.parsers import build_parser
from kernel.errors import ConfigError, KernelError
from locator.errors import LocatorError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported only now: `--help` and usage errors never pay for structlog or any command's dependencies.
    from kernel.logs import configure_logging

    try:
        configure_logging(level=log_level(args, stderr_is_a_terminal=sys.stderr.isatty()), fmt=args.log_format)
    except ValueError as e:
        print(f"noetl-edge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = importlib.import_module(args.run).run
    try:
        code = run(args)
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
