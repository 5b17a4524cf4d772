"""A small sandboxed expression language for ``when`` guards, ``loop.over`` and arg templates.

User text is never handed to Python's ``eval``, ``exec`` or ``compile``.
``ast.parse(text, mode="eval")`` is used only as a parser: the tree is checked
against a whitelist once (:func:`compile_expression`) and then evaluated by
this module's own walker over plain JSON data (dicts, lists, str, int, float,
bool, None), so no Python object, attribute or callable is ever reachable.

Grammar (a subset of Python expression syntax)::

    expr     := literal | path | call | list | unary | binary | compare | boolean | "(" expr ")"
    literal  := str | int | float | True | False | None | true | false | null
    path     := root ( "." name | "[" key "]" )*       root: workload steps item index (+ a loop's ``as``)
    key      := str | int | -int | path
    call     := func "(" expr ("," expr)* ")"          func: len lower upper str int float bool
                                                             min max contains startswith endswith
    list     := "[" expr, ... "]" | "(" expr, ... ")"   (tuples evaluate to lists)
    unary    := "not" expr | "-" expr | "+" expr
    binary   := expr ("+" | "-" | "*" | "/" | "%") expr
    compare  := expr (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") expr)+
    boolean  := expr ("and" | "or") expr

Semantics worth knowing:

* Lookups are total: a missing key, an index out of range, or a lookup on a
  value that is not a dict/list (including None) evaluates to ``None``, so
  ``workload.a.b.c`` is ``None`` when ``a`` is absent. Missing also reads as
  empty where that is unambiguous: ``len(None) == 0``, ``x in None`` is
  ``False``, ``contains``/``startswith``/``endswith`` on ``None`` are
  ``False``, ``lower``/``upper`` of ``None`` are ``None``.
* Everything else that has no sensible answer (``"a" < 1``, ``None + 1``,
  ``1 / 0``, ``int("x")``, a non-finite float) raises :class:`ExpressionError`
  at evaluation time; nothing else ever escapes :meth:`Expression.evaluate`.
* ``and``/``or`` short-circuit and return an operand, ``==`` is Python
  equality, truthiness is Python truthiness of the JSON value.
* Strings are rendered for interpolation and by ``str()`` as themselves;
  every other value as compact JSON (``true``, ``null``, ``[1,2]``).
* Bounds: text of at most :data:`MAX_LENGTH` characters, at most
  :data:`MAX_NODES` syntax nodes, and no string or list produced by ``+``,
  ``*``, ``str()`` or interpolation longer than :data:`MAX_SIZE`.

Rejected at compile time, with the construct and its column: calls to any
other name, method calls, keyword arguments, attribute access on anything but
a path (``"a".upper``), dunder attributes, names outside the roots, lambdas,
comprehensions, f-strings, starred expressions, ``:=``, conditional
expressions, dict/set literals, slices, ``**``, ``//`` and bitwise operators,
``is``/``is not``, and bytes/complex/``...`` literals.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from system_playbooks.orchestrate.errors import ExpressionError

__all__ = [
    "FUNCTIONS",
    "MAX_LENGTH",
    "MAX_NODES",
    "MAX_SIZE",
    "ROOTS",
    "Expression",
    "ExpressionError",
    "Reference",
    "compile_expression",
    "to_text",
]

MAX_LENGTH: Final = 1_000
MAX_NODES: Final = 200
MAX_SIZE: Final = 100_000

ROOTS: Final = frozenset({"workload", "steps", "item", "index"})
LITERALS: Final[Mapping[str, Any]] = {"true": True, "false": False, "null": None}

_BINOPS: Final[Mapping[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Mod: "%",
}
_CMPOPS: Final[Mapping[type[ast.cmpop], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}
_REJECTED: Final[Mapping[type[ast.AST], str]] = {
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Starred: "starred expression",
    ast.NamedExpr: "assignment expression ':='",
    ast.IfExp: "conditional expression 'x if c else y'",
    ast.Dict: "dict literal",
    ast.Set: "set literal",
    ast.Slice: "slice",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_OPERATOR_NAMES: Final[Mapping[type[ast.AST], str]] = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Invert: "~",
    ast.Is: "is",
    ast.IsNot: "is not",
}
# Operator, context and comparison nodes carry no user data: only expressions count towards MAX_NODES.
_UNCOUNTED = (ast.expr_context, ast.operator, ast.cmpop, ast.boolop, ast.unaryop)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_TOKEN = re.compile(r"\w+|\S")


# --- values ---------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "bool"
        case int():
            return "int"
        case float():
            return "float"
        case str():
            return "str"
        case list() | tuple():
            return "list"
        case dict():
            return "dict"
    return type(value).__name__


def _json_size_exceeds(value: object, budget: int) -> bool:
    """Whether ``value`` as JSON is longer than ``budget`` characters (a fast, early-exit estimate)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            budget -= len(item) + 2
        elif isinstance(item, dict):
            budget -= 2 + len(item)
            for key, sub in item.items():
                budget -= len(key) + 3 if isinstance(key, str) else 8
                stack.append(sub)
        elif isinstance(item, (list, tuple)):
            budget -= 2 + len(item)
            stack.extend(item)
        else:
            budget -= 8
        if budget < 0:
            return True
    return False


def to_text(value: object) -> str:
    """Render a value for interpolation: strings as themselves, anything else as compact JSON.

    >>> to_text("a"), to_text(True), to_text(None), to_text([1, "x"])
    ('a', 'true', 'null', '[1,"x"]')
    """
    if isinstance(value, str):
        text = value
    else:
        if _json_size_exceeds(value, MAX_SIZE):
            raise ExpressionError(f"rendering a {_type(value)} would exceed {MAX_SIZE} characters")
        try:
            text = msgspec.json.encode(value).decode("utf-8")
        except (TypeError, ValueError, OverflowError) as e:
            raise ExpressionError(f"cannot render a {_type(value)} as text: {e}") from e
    if len(text) > MAX_SIZE:
        raise ExpressionError(f"rendered text would exceed {MAX_SIZE} characters")
    return text


def _lookup(container: object, key: object) -> Any:
    if isinstance(container, dict):
        if isinstance(key, (str, int, float, bool)) or key is None:
            return container.get(key)
        return None
    if isinstance(container, (list, tuple)) and isinstance(key, int) and not isinstance(key, bool):
        if -len(container) <= key < len(container):
            return container[key]
    return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError("result is not a finite number")
    return value


def _repeat(seq: Any, times: Any) -> Any:
    if not (isinstance(times, int) and not isinstance(times, bool)):
        raise ExpressionError(f"cannot repeat a {_type(seq)} by a {_type(times)}")
    if len(seq) * max(times, 0) > MAX_SIZE:
        raise ExpressionError(f"repetition would exceed {MAX_SIZE} elements")
    return list(seq) * times if isinstance(seq, tuple) else seq * times


def _binop(op: str, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        if op in ("/", "%") and b == 0:
            raise ExpressionError("division by zero")
        try:
            match op:
                case "+":
                    return _finite(a + b)
                case "-":
                    return _finite(a - b)
                case "*":
                    return _finite(a * b)
                case "/":
                    return _finite(a / b)
                case _:
                    return _finite(a % b)
        except OverflowError as e:
            raise ExpressionError("result is not a finite number") from e
    if op == "+" and (
        (isinstance(a, str) and isinstance(b, str))
        or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))
    ):
        if len(a) + len(b) > MAX_SIZE:
            raise ExpressionError(f"concatenation would exceed {MAX_SIZE} elements")
        if isinstance(a, str) and isinstance(b, str):
            return a + b
        return [*a, *b]
    if op == "*" and isinstance(a, (str, list, tuple)):
        return _repeat(a, b)
    if op == "*" and isinstance(b, (str, list, tuple)):
        return _repeat(b, a)
    raise ExpressionError(f"unsupported operand types for {op}: {_type(a)} and {_type(b)}")


def _contains(container: Any, item: Any) -> bool:
    if container is None:
        return False
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ExpressionError(f"'in <str>' requires a str on the left, not {_type(item)}")
        return item in container
    if isinstance(container, (list, tuple)):
        return any(item == element for element in container)
    if isinstance(container, dict):
        return isinstance(item, str) and item in container
    raise ExpressionError(f"'in' needs a str, list or dict on the right, not {_type(container)}")


def _compare(op: str, a: Any, b: Any) -> bool:
    match op:
        case "==":
            return bool(a == b)
        case "!=":
            return bool(a != b)
        case "in":
            return _contains(b, a)
        case "not in":
            return not _contains(b, a)
    comparable = (
        (_is_number(a) and _is_number(b))
        or (isinstance(a, str) and isinstance(b, str))
        or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))
    )
    if not comparable:
        raise ExpressionError(f"cannot compare {_type(a)} {op} {_type(b)}")
    try:
        match op:
            case "<":
                return bool(a < b)
            case "<=":
                return bool(a <= b)
            case ">":
                return bool(a > b)
            case _:
                return bool(a >= b)
    except TypeError as e:  # lists holding mixed types
        raise ExpressionError(f"cannot compare {_type(a)} {op} {_type(b)}: {e}") from e


# --- functions ------------------------------------------------------------


def _fn_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    raise ExpressionError(f"len() of a {_type(value)}")


def _fn_case(upper: bool) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ExpressionError(f"{'upper' if upper else 'lower'}() of a {_type(value)}")
        return value.upper() if upper else value.lower()

    return convert


def _fn_int(value: Any) -> int:
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(_finite(value))
    if isinstance(value, str) and len(value) <= 100:
        try:
            return int(value.strip())
        except ValueError:
            raise ExpressionError(f"int() of {value!r}: not an integer") from None
    raise ExpressionError(f"int() of a {_type(value)}")


def _fn_float(value: Any) -> float:
    if isinstance(value, bool | int | float):
        try:
            number = float(value)
        except OverflowError:
            raise ExpressionError("result is not a finite number") from None
        return float(_finite(number))
    if isinstance(value, str) and len(value) <= 100:
        try:
            number = float(value.strip())
        except ValueError:
            raise ExpressionError(f"float() of {value!r}: not a number") from None
        return float(_finite(number))
    raise ExpressionError(f"float() of a {_type(value)}")


def _fn_extreme(name: str, pick: Callable[[list[Any]], Any]) -> Callable[..., Any]:
    def choose(*args: Any) -> Any:
        values = args[0] if len(args) == 1 else list(args)
        if not isinstance(values, (list, tuple)):
            raise ExpressionError(f"{name}() of one argument needs a list, not a {_type(values)}")
        if not values:
            raise ExpressionError(f"{name}() of an empty list")
        for value in values[1:]:
            _compare("<", values[0], value)  # raises on incomparable elements
        try:
            return pick(list(values))
        except TypeError as e:  # nested lists holding mixed types
            raise ExpressionError(f"{name}() of values that cannot be compared: {e}") from e

    return choose


def _fn_affix(name: str, test: Callable[[str, str], bool]) -> Callable[[Any, Any], bool]:
    def check(text: Any, affix: Any) -> bool:
        if text is None:
            return False
        if not (isinstance(text, str) and isinstance(affix, str)):
            raise ExpressionError(f"{name}() needs two str, not {_type(text)} and {_type(affix)}")
        return test(text, affix)

    return check


FUNCTIONS: Final[Mapping[str, tuple[Callable[..., Any], int, int | None]]] = {
    # name: (implementation, min args, max args or None for unbounded)
    "len": (_fn_len, 1, 1),
    "lower": (_fn_case(False), 1, 1),
    "upper": (_fn_case(True), 1, 1),
    "str": (to_text, 1, 1),
    "int": (_fn_int, 1, 1),
    "float": (_fn_float, 1, 1),
    "bool": (bool, 1, 1),
    "min": (_fn_extreme("min", min), 1, None),
    "max": (_fn_extreme("max", max), 1, None),
    "contains": (_contains, 2, 2),
    "startswith": (_fn_affix("startswith", str.startswith), 2, 2),
    "endswith": (_fn_affix("endswith", str.endswith), 2, 2),
}


# --- compile --------------------------------------------------------------


class _Source:
    """Maps ast positions (line, UTF-8 byte offset) back to 1-based character columns of the text."""

    def __init__(self, text: str, lead: int) -> None:
        self.lead = lead
        self.starts: list[int] = [0]
        self.lines = _LINE_BREAK.split(text)
        for match in _LINE_BREAK.finditer(text):
            self.starts.append(match.end())

    def column(self, node: ast.AST) -> int:
        lineno = getattr(node, "lineno", 1)
        offset = getattr(node, "col_offset", 0)
        return self.char_column(lineno, len(self._line(lineno).encode("utf-8")[:offset].decode("utf-8", "ignore")) + 1)

    def char_column(self, lineno: int, offset: int) -> int:
        index = min(max(lineno, 1), len(self.starts)) - 1
        return self.lead + self.starts[index] + max(offset, 1)

    def _line(self, lineno: int) -> str:
        return self.lines[min(max(lineno, 1), len(self.lines)) - 1]


class _Checker:
    def __init__(self, source: _Source, names: frozenset[str]) -> None:
        self.source = source
        self.names = names

    def fail(self, what: str, node: ast.AST) -> ExpressionError:
        return ExpressionError(what, column=self.source.column(node))

    def is_path(self, node: ast.expr) -> bool:
        match node:
            case ast.Name(id=name):
                return name in self.names
            case ast.Attribute(value=base) | ast.Subscript(value=base):
                return self.is_path(base)
        return False

    def check(self, node: ast.AST) -> None:
        match node:
            case ast.Constant(value=value):
                if value is not None and not isinstance(value, (str, int, float, bool)):
                    raise self.fail(f"{type(value).__name__} literal is not allowed", node)
            case ast.Name(id=name):
                if name not in self.names and name not in LITERALS:
                    raise self.fail(f"unknown name {name!r} (use one of {', '.join(sorted(self.names))})", node)
            case ast.Attribute(value=base, attr=attr):
                if attr.startswith("__"):
                    raise self.fail(f"dunder attribute {attr!r} is not allowed", node)
                self.check_root(base)
                if not self.is_path(base):
                    raise self.fail(f"attribute {attr!r} on a value that is not a path from {self._roots()}", node)
                self.check(base)
            case ast.Subscript(value=base, slice=key):
                self.check_root(base)
                if not self.is_path(base):
                    raise self.fail(f"subscript on a value that is not a path from {self._roots()}", node)
                self.check(base)
                self.check_key(key)
            case ast.Call(func=func, args=args, keywords=keywords):
                self.check_call(node, func, args, keywords)
            case ast.List(elts=elements) | ast.Tuple(elts=elements):
                for element in elements:
                    self.check(element)
            case ast.UnaryOp(op=ast.Not() | ast.USub() | ast.UAdd(), operand=operand):
                self.check(operand)
            case ast.UnaryOp(op=op):
                raise self.fail(f"operator {_op_name(op)!r} is not allowed", node)
            case ast.BinOp(left=left, op=op, right=right):
                if type(op) not in _BINOPS:
                    raise self.fail(f"operator {_op_name(op)!r} is not allowed (use + - * / %)", node)
                self.check(left)
                self.check(right)
            case ast.BoolOp(values=operands):
                for operand_node in operands:
                    self.check(operand_node)
            case ast.Compare(left=first, ops=comparisons, comparators=comparators):
                for comparison in comparisons:
                    if type(comparison) not in _CMPOPS:
                        raise self.fail(f"comparison {_op_name(comparison)!r} is not allowed", node)
                self.check(first)
                for comparator in comparators:
                    self.check(comparator)
            case _:
                what = _REJECTED.get(type(node), f"{type(node).__name__} expression")
                raise self.fail(f"{what} is not allowed", node)

    def check_root(self, node: ast.expr) -> None:
        # `user.name` without a loop variable `user` is an unknown name, not a malformed path.
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        if isinstance(node, ast.Name):
            self.check(node)

    def check_key(self, key: ast.expr) -> None:
        match key:
            case ast.Constant(value=str() | int() as constant) if not isinstance(constant, bool):
                return
            case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int() as number)) if not isinstance(
                number, bool
            ):
                return
        if not self.is_path(key):
            raise self.fail(f"subscript key must be a str or int constant or a path from {self._roots()}", key)
        self.check(key)

    def check_call(self, node: ast.AST, func: ast.expr, args: list[ast.expr], keywords: list[ast.keyword]) -> None:
        if not isinstance(func, ast.Name):
            raise self.fail("method call is not allowed (use a function such as lower(x))", node)
        if func.id not in FUNCTIONS:
            raise self.fail(f"call to {func.id!r} is not allowed (functions: {', '.join(FUNCTIONS)})", node)
        if keywords:
            raise self.fail(f"keyword argument to {func.id}() is not allowed", keywords[0])
        _, low, high = FUNCTIONS[func.id]
        if len(args) < low or (high is not None and len(args) > high):
            expected = str(low) if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise self.fail(f"{func.id}() takes {expected} argument(s), got {len(args)}", node)
        for arg in args:
            self.check(arg)

    def _roots(self) -> str:
        return "/".join(sorted(self.names))


def _op_name(op: ast.AST) -> str:
    return _OPERATOR_NAMES.get(type(op), type(op).__name__)


def _syntax_error(source: _Source, text: str, e: SyntaxError) -> ExpressionError:
    if e.offset is None or e.lineno is None:
        return ExpressionError(f"invalid expression: {e.msg}")
    line = source._line(e.lineno)
    column = source.char_column(e.lineno, e.offset)
    if e.msg == "invalid syntax":
        if 1 <= e.offset <= len(line):
            token = _TOKEN.match(line, e.offset - 1)
            return ExpressionError(f"unexpected {token.group() if token else line[e.offset - 1]!r}", column=column)
        return ExpressionError("unexpected end of expression", column=source.lead + len(text) + 1)
    return ExpressionError(e.msg, column=column)


@dataclasses.dataclass(frozen=True, slots=True)
class Reference:
    """One use of a root name in an expression, as :meth:`Expression.references` lists them.

    ``key`` is the first key after the root when it is a constant (``"fetch"``
    in ``steps.fetch.result`` and in ``steps['fetch']``, ``0`` in ``item[0]``),
    None for a bare root or a computed key (``steps[workload.name]``);
    ``column`` is the 1-based character position of the path in the text.
    """

    root: str
    key: str | int | None
    column: int


def _constant_key(node: ast.expr) -> str | int | None:
    match node:
        case ast.Constant(value=str() | int() as value) if not isinstance(value, bool):
            return value
        case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int() as number)) if not isinstance(number, bool):
            return -number
    return None


class Expression:
    """A validated expression, ready to evaluate any number of times.

    Build one with :func:`compile_expression`; evaluation never executes user
    code and only reads the context given.

    >>> e = compile_expression("workload.n * 2 > 5 and 'b' in steps.fetch.result.tags")
    >>> e.evaluate({"workload": {"n": 3}, "steps": {"fetch": {"result": {"tags": ["a", "b"]}}}})
    True
    >>> compile_expression("workload.missing.deeper").evaluate({"workload": {}}) is None
    True
    """

    __slots__ = ("_source", "_tree", "text")

    def __init__(self, text: str, tree: ast.expr, source: _Source) -> None:
        self.text = text
        self._tree = tree
        self._source = source

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    def references(self) -> tuple[Reference, ...]:
        """Every use of a root name (not of a literal such as ``null``), in the order of the text.

        >>> [(r.root, r.key) for r in compile_expression("steps.a.result + steps['b'].n + len(workload)").references()]
        [('steps', 'a'), ('steps', 'b'), ('workload', None)]
        """
        found: list[Reference] = []
        seen: set[int] = set()  # names already counted as the root of a path, and function names
        for node in ast.walk(self._tree):
            match node:
                case ast.Attribute(value=ast.Name(id=root) as base, attr=attr):
                    seen.add(id(base))
                    found.append(Reference(root, attr, self._source.column(node)))
                case ast.Subscript(value=ast.Name(id=root) as base, slice=key):
                    seen.add(id(base))
                    found.append(Reference(root, _constant_key(key), self._source.column(node)))
                case ast.Call(func=func):
                    seen.add(id(func))
        for node in ast.walk(self._tree):
            if isinstance(node, ast.Name) and id(node) not in seen and node.id not in LITERALS:
                found.append(Reference(node.id, None, self._source.column(node)))
        return tuple(sorted(found, key=lambda reference: reference.column))

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """Evaluate over ``context`` (``workload``, ``steps``, ``item``, ``index``…); a root not given is None."""
        return self._eval(self._tree, context)

    def _eval(self, node: ast.expr, ctx: Mapping[str, Any]) -> Any:
        try:
            return self._step(node, ctx)
        except ExpressionError as e:
            if e.column is None:
                raise ExpressionError(e.reason, column=self._source.column(node)) from e
            raise

    def _step(self, node: ast.expr, ctx: Mapping[str, Any]) -> Any:
        match node:
            case ast.Constant(value=value):
                return value
            case ast.Name(id=name):
                return LITERALS[name] if name in LITERALS else ctx.get(name)
            case ast.Attribute(value=base, attr=attr):
                return _lookup(self._eval(base, ctx), attr)
            case ast.Subscript(value=base, slice=key):
                return _lookup(self._eval(base, ctx), self._eval(key, ctx))
            case ast.List(elts=elements) | ast.Tuple(elts=elements):
                return [self._eval(element, ctx) for element in elements]
            case ast.UnaryOp(op=ast.Not(), operand=operand):
                return not self._eval(operand, ctx)
            case ast.UnaryOp(op=op, operand=operand):
                value = self._eval(operand, ctx)
                if not _is_number(value):
                    raise ExpressionError(f"unary {'-' if isinstance(op, ast.USub) else '+'} of a {_type(value)}")
                return -value if isinstance(op, ast.USub) else +value
            case ast.BinOp(left=left, op=op, right=right):
                return _binop(_BINOPS[type(op)], self._eval(left, ctx), self._eval(right, ctx))
            case ast.BoolOp(op=op, values=values):
                result: Any = None
                for value_node in values:
                    result = self._eval(value_node, ctx)
                    if bool(result) != isinstance(op, ast.And):
                        return result
                return result
            case ast.Compare(left=first, ops=comparisons, comparators=comparators):
                current = self._eval(first, ctx)
                for comparison, comparator in zip(comparisons, comparators):
                    right = self._eval(comparator, ctx)
                    if not _compare(_CMPOPS[type(comparison)], current, right):
                        return False
                    current = right
                return True
            case ast.Call(func=ast.Name(id=name), args=args):
                function = FUNCTIONS[name][0]
                return function(*(self._eval(arg, ctx) for arg in args))
        raise ExpressionError(f"cannot evaluate {type(node).__name__}")  # unreachable after the checker


@functools.lru_cache(maxsize=4096)
def _compile(text: str, names: frozenset[str]) -> Expression:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is {len(text)} characters long, more than {MAX_LENGTH}")
    stripped = text.lstrip()
    source = _Source(stripped.rstrip(), len(text) - len(stripped))
    if not stripped.strip():
        raise ExpressionError("empty expression")
    try:
        tree = ast.parse(stripped.rstrip(), mode="eval")
    except SyntaxError as e:
        raise _syntax_error(source, stripped.rstrip(), e) from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"invalid expression: {e}") from None
    count = sum(1 for node in ast.walk(tree.body) if not isinstance(node, _UNCOUNTED))
    if count > MAX_NODES:
        raise ExpressionError(f"expression has {count} syntax nodes, more than {MAX_NODES}")
    _Checker(source, names).check(tree.body)
    return Expression(text, tree.body, source)


def compile_expression(text: str, *, names: frozenset[str] = ROOTS) -> Expression:
    """Parse and validate ``text`` once; raise :class:`ExpressionError` naming the construct and column.

    ``names`` are the roots a path may start from (a loop step adds its ``as`` name).

    >>> compile_expression("len(workload.items) >= 2").evaluate({"workload": {"items": [1, 2]}})
    True
    >>> compile_expression("__import__('os')")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    system_playbooks.orchestrate.errors.ExpressionError: call to '__import__' is not allowed (...) at column 1
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be a string, not {_type(text)}")
    return _compile(text, names)
