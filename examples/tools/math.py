"""Arithmetic for the loop example."""

from __future__ import annotations


def multiply(a: float, b: float, label: str | None = None) -> float | dict[str, object]:
    """``a * b``; with a ``label``, ``{"label": label, "value": a * b}`` (so a loop's order is visible).

    >>> multiply(3, 4)
    12
    >>> multiply(2, 2, label="item-1")
    {'label': 'item-1', 'value': 4}
    """
    value = a * b
    return value if label is None else {"label": label, "value": value}
