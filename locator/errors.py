"""The one error root of the locator package and its typed subclasses."""

from __future__ import annotations


class LocatorError(ValueError):
    """Root of every error the locator raises: bad input, never an I/O failure."""


class InvalidName(LocatorError):
    """A tenant, project, affinity or cell name breaks the naming rule.

    ``field`` names the offending field so callers (CLI, edge) can point at it.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidUrn(LocatorError):
    """A string is not a ``noetl://`` execution or result URN."""


class InvalidTopology(LocatorError):
    """A topology file or setting is inconsistent (shard ownership, URLs, counts)."""


class InvalidSubject(LocatorError):
    """A subject is not a WAL event subject of this runtime."""
