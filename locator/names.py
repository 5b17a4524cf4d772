"""Name rules shared by every subject, stream and URN the runtime builds.

Names become NATS subject tokens, so dots, wildcards and whitespace are
refused here, before anything reaches a server.
"""

from __future__ import annotations

import re

from locator.errors import InvalidName

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = "lowercase letters, digits, '_' or '-', starting with a letter or digit, at most 63 characters"

EXECUTION_ID_RE = re.compile(r"^[1-9][0-9]{0,18}$")
INT64_MAX = 2**63 - 1


def check_name(field: str, value: object, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is a valid name, else raise :class:`InvalidName`.

    >>> check_name("tenant", "acme")
    'acme'
    """
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string, got {type(value).__name__}", field=field)
    if value == "" and allow_empty:
        return value
    if NAME_RE.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidName(f"invalid {field} {shown!r}: must match {NAME_PATTERN} ({NAME_RULE})", field=field)
    return value


def check_execution_id(value: object, *, field: str = "execution_id") -> str:
    """Return ``value`` if it is a positive int64 in decimal, else raise :class:`InvalidName`."""
    if not isinstance(value, str) or EXECUTION_ID_RE.fullmatch(value) is None or int(value) > INT64_MAX:
        raise InvalidName(
            f"invalid {field} {value!r}: must be a positive decimal int64 without leading zeros (a snowflake id such as '1234567890123')",
            field=field,
        )
    return value


STEP_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$"
STEP_RE = re.compile(STEP_PATTERN)


def check_step(value: object, *, field: str = "step") -> str:
    """Return ``value`` if it is a valid step name (letters, digits, '_' or '-', at most 128)."""
    if not isinstance(value, str) or STEP_RE.fullmatch(value) is None:
        raise InvalidName(f"invalid {field} {value!r}: must match {STEP_PATTERN}", field=field)
    return value
