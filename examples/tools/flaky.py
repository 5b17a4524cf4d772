"""Tools that fail on purpose, for the retry and on_error examples."""

from __future__ import annotations

from typing import Any


class FlakyError(RuntimeError):
    """Raised by the tools of this module when they fail on purpose."""


def fail_until(attempt_needed: int, noetl: dict[str, Any]) -> int:
    """Fail until the step's attempt (``noetl["attempt"]``) reaches ``attempt_needed``; return the attempt.

    >>> fail_until(2, {"attempt": 2})
    2
    """
    attempt = int(noetl["attempt"])
    if attempt < attempt_needed:
        raise FlakyError(f"attempt {attempt} fails on purpose (succeeds from attempt {attempt_needed})")
    return attempt


def always_fail(message: str) -> None:
    """Raise :class:`FlakyError` with ``message``, every time."""
    raise FlakyError(message)
