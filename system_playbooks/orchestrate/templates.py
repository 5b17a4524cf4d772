"""Arg templates: ``{{ expr }}`` inside JSON-like values, compiled once, rendered per step.

A string that is exactly ``{{ expr }}`` becomes the expression's value with its
type; text around expressions makes a string (values rendered as in
:func:`~system_playbooks.orchestrate.expressions.to_text`). Dict values and
list items are templated recursively; keys are not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from system_playbooks.orchestrate.errors import ExpressionError
from system_playbooks.orchestrate.expressions import MAX_SIZE, ROOTS, Expression, _compile, compile_expression, to_text

__all__ = ["MAX_TEMPLATE_DEPTH", "Template", "compile_template", "render_template"]

MAX_TEMPLATE_DEPTH: Final = 64


_TEMPLATE_RE: Final = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_KEY_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclasses.dataclass(frozen=True, slots=True)
class _Placed:
    """An expression found inside a template string, ``offset`` characters from the string's start."""

    expression: Expression
    offset: int

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        try:
            return self.expression.evaluate(context)
        except ExpressionError as e:
            raise _shift(e, self.offset) from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Interpolation:
    parts: tuple[str | _Placed, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Whole:
    expression: _Placed


def _shift(e: ExpressionError, offset: int, path: str = "") -> ExpressionError:
    """Re-anchor an expression's error column on the whole template string."""
    return ExpressionError(e.reason, column=None if e.column is None else e.column + offset, path=path or e.path)


def _place(match: re.Match[str], names: frozenset[str]) -> _Placed:
    try:
        return _Placed(compile_expression(match.group(1), names=names), match.start(1))
    except ExpressionError as e:
        raise _shift(e, match.start(1)) from None


def _key_path(key: object) -> str:
    return f".{key}" if isinstance(key, str) and _KEY_RE.match(key) else f"[{key!r}]"


def _compile_node(value: Any, names: frozenset[str], path: str, depth: int) -> Any:
    if depth > MAX_TEMPLATE_DEPTH:
        raise ExpressionError(f"value nested deeper than {MAX_TEMPLATE_DEPTH} levels", path=path)
    if isinstance(value, dict):
        return {k: _compile_node(v, names, path + _key_path(k), depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_compile_node(v, names, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if not isinstance(value, str) or "{{" not in value:
        return value
    try:
        whole = _TEMPLATE_RE.fullmatch(value)
        if whole is not None and "{{" not in whole.group(1) and "}}" not in whole.group(1):
            return _Whole(_place(whole, names))
        parts: list[str | _Placed] = []
        position = 0
        for match in _TEMPLATE_RE.finditer(value):
            literal = value[position : match.start()]
            if "{{" in literal:
                break
            parts.extend([literal, _place(match, names)])
            position = match.end()
        if "{{" in value[position:]:
            raise ExpressionError("unclosed '{{'", column=value.index("{{", position) + 1)
        parts.append(value[position:])
        return _Interpolation(tuple(part for part in parts if part != ""))
    except ExpressionError as e:
        raise _shift(e, 0, path) from None


def _placed(node: Any, path: str) -> Iterator[tuple[str, _Placed]]:
    match node:
        case _Whole(expression=placed):
            yield path, placed
        case _Interpolation(parts=parts):
            for part in parts:
                if isinstance(part, _Placed):
                    yield path, part
        case dict():
            for key, value in node.items():
                yield from _placed(value, path + _key_path(key))
        case list():
            for i, value in enumerate(node):
                yield from _placed(value, f"{path}[{i}]")


def _render_node(node: Any, context: Mapping[str, Any]) -> Any:
    match node:
        case _Whole(expression=expression):
            return expression.evaluate(context)
        case _Interpolation(parts=parts):
            text = "".join(part if isinstance(part, str) else to_text(part.evaluate(context)) for part in parts)
            if len(text) > MAX_SIZE:
                raise ExpressionError(f"rendered text would exceed {MAX_SIZE} characters")
            return text
        case dict():
            return {k: _render_node(v, context) for k, v in node.items()}
        case list():
            return [_render_node(v, context) for v in node]
    return node


class Template:
    """A JSON value whose strings may hold ``{{ expr }}``; validated once, rendered many times.

    A string that is exactly one ``{{ expr }}`` becomes the expression's value
    with its type; a string with text around expressions becomes a string
    (see :func:`to_text`). Dict values and list items are templated
    recursively; dict keys and non-string scalars are kept as they are.

    >>> t = compile_template({"n": "{{ workload.n }}", "id": "id-{{ workload.n }}", "raw": 1})
    >>> t.render({"workload": {"n": 7}})
    {'n': 7, 'id': 'id-7', 'raw': 1}
    """

    __slots__ = ("_node", "value")

    def __init__(self, value: Any, node: Any) -> None:
        self.value = value
        self._node = node

    def __repr__(self) -> str:
        return f"Template({self.value!r})"

    def expressions(self) -> Iterator[tuple[str, int, Expression]]:
        """Each ``{{ expr }}`` in document order: the path of its string (``.headers.X``, ``[2]``), the offset of
        the expression's text in that string (add it to a column of the expression), and the expression.

        >>> [(path, offset, e.text) for path, offset, e in compile_template({"a": ["x {{ workload.n }}"]}).expressions()]
        [('.a[0]', 4, ' workload.n ')]
        """
        for path, placed in _placed(self._node, ""):
            yield path, placed.offset, placed.expression

    def render(self, context: Mapping[str, Any]) -> Any:
        """Render over ``context``; raise :class:`ExpressionError` if an expression cannot be evaluated."""
        return _render_node(self._node, context)


def compile_template(value: Any, *, names: frozenset[str] = ROOTS) -> Template:
    """Validate every ``{{ expr }}`` in ``value``; a failure's ``path`` says where (``.headers.X``, ``[2]``)."""
    return Template(value, _compile_node(value, names, "", 0))


def render_template(value: Any, context: Mapping[str, Any], *, names: frozenset[str] = ROOTS) -> Any:
    """Compile and render ``value`` in one go.

    >>> render_template(["{{ item }}", "#{{ index + 1 }}"], {"item": {"a": 1}, "index": 0})
    [{'a': 1}, '#1']
    """
    return compile_template(value, names=names).render(context)
