"""The one error root of the orchestrate plug-in and its typed subclasses."""

from __future__ import annotations


class OrchestrateError(ValueError):
    """Root of every error the orchestrate plug-in raises about user input."""


class ExpressionError(OrchestrateError):
    """An expression or template is not in the sandboxed language, or cannot be evaluated.

    ``column`` is the 1-based character position of the offending construct in
    the expression text, when one is known; ``path`` locates a template
    expression inside a nested value (``.headers.Authorization``, ``[2]``).
    """

    def __init__(self, reason: str, *, column: int | None = None, path: str = "") -> None:
        super().__init__(reason if column is None else f"{reason} at column {column}")
        self.reason = reason
        self.column = column
        self.path = path


class PlaybookError(OrchestrateError):
    """A playbook is invalid; the message starts with the path of the problem.

    ``path`` is that location alone (``steps[2].next[0].when``), empty for a
    problem with the document as a whole.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message
