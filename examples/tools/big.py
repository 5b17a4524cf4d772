"""Large results, for the result-by-reference examples."""

from __future__ import annotations


def rows(n: int, width: int = 64) -> list[dict[str, object]]:
    """``n`` flat rows of about ``width + 70`` bytes of JSON each (40,000 rows ≈ 5 MB).

    >>> rows(2, width=3)[1]
    {'id': 1, 'name': 'row-00000001', 'value': 0.5, 'even': False, 'pad': 'xxx'}
    """
    pad = "x" * width
    return [{"id": i, "name": f"row-{i:08d}", "value": i / 2, "even": i % 2 == 0, "pad": pad} for i in range(n)]
