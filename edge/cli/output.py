"""What every command prints: exit codes, JSON results on stdout, one error line on stderr.

>>> fail("no such playbook", EXIT_USAGE)
2
"""

from __future__ import annotations

import sys

import msgspec

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def print_json(obj: object) -> None:
    """One compact JSON document on stdout (a command's result, for pipes and scripts)."""
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def fail(message: str, code: int) -> int:
    """Print ``noetl-edge: error: <message>`` on stderr; returns ``code`` for the command to exit with."""
    print(f"noetl-edge: error: {message}", file=sys.stderr)
    return code
