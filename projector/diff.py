"""What changed between two projections of one execution, field by field.

>>> from projector.projection import Projection, StepState
>>> a = Projection(execution_id="7", tenant="acme", project="web", status="RUNNING", last_seq=4)
>>> b = Projection(execution_id="7", tenant="acme", project="web", status="COMPLETED", last_seq=9,
...                steps={"a": StepState(status="COMPLETED", result=3)})
>>> [(c.path, c.before, c.after if c.path != "steps.a" else c.after["status"]) for c in diff_projections(a, b)]
[('last_seq', 4, 9), ('status', 'RUNNING', 'COMPLETED'), ('steps.a', None, 'COMPLETED')]
"""

from __future__ import annotations

from typing import Any

import msgspec

from projector.projection import Projection

_ABSENT: Any = None


class Change(msgspec.Struct, frozen=True):
    """``path`` (dotted: ``steps.fetch.status``) went from ``before`` to ``after`` (None: absent)."""

    path: str
    before: Any
    after: Any


def _walk(path: str, a: Any, b: Any, out: list[Change]) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict) and path.count(".") < 2:
        # Down to a step's fields (steps.<name>.<field>); below that a value is shown whole.
        for key in sorted(a.keys() | b.keys()):
            _walk(f"{path}.{key}" if path else str(key), a.get(key, _ABSENT), b.get(key, _ABSENT), out)
        return
    out.append(Change(path, a, b))


def diff_projections(before: Projection | None, after: Projection | None) -> list[Change]:
    """Every field that differs, sorted by path; a new step is one change holding its whole state."""
    a = msgspec.to_builtins(before) if before is not None else {}
    b = msgspec.to_builtins(after) if after is not None else {}
    out: list[Change] = []
    _walk("", a, b, out)
    return out
