"""The one error root of the projector package and its typed subclasses."""

from __future__ import annotations


class ProjectorError(RuntimeError):
    """Root of every error the projector raises."""


class FoldError(ProjectorError):
    """An event does not belong to the projection it is folded into (identity mismatch)."""


class ReplayLimitExceeded(ProjectorError):
    """A replay would read more events than its limit allows."""
