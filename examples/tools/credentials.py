"""A tool that shows the keychain's exact-value masking: it returns the credential it was given, verbatim.

The worker masks every resolved value in a step's result, so what the
projection shows is ``***``, never the value.
"""

from __future__ import annotations

from typing import Any


def reveal(noetl: dict[str, Any], name: str = "api", pad: int = 0) -> dict[str, Any]:
    """``{"value": <the credential called name>}``, with ``pad`` more copies in ``copies`` (a big result)."""
    value = noetl["credentials"][name]
    return {"value": value, "copies": [f"{i}:{value}" for i in range(pad)]}


def table_of(rows: list[str], noetl: dict[str, Any]) -> Any:
    """An Arrow table of ``rows`` (a result the worker stores by reference)."""
    import pyarrow as pa

    return pa.table({"v": rows})


def fail_with(noetl: dict[str, Any], name: str = "api") -> None:
    """Raise an error whose message holds the credential."""
    raise ValueError(f"the server refused {noetl['credentials'][name]}")


def log_it(noetl: dict[str, Any], name: str = "api") -> None:
    """Write the credential to a log line."""
    import structlog

    structlog.get_logger("examples.tools.credentials").info("tool.said", value=noetl["credentials"][name])
