"""The sandboxed expression language: what it accepts, what it rejects, and its bounds."""

from __future__ import annotations

import string
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from system_playbooks.orchestrate.expressions import (
    MAX_LENGTH,
    MAX_SIZE,
    ExpressionError,
    compile_expression,
)

CONTEXT: dict[str, Any] = {
    "workload": {
        "n": 3,
        "f": 1.5,
        "s": "Hello",
        "flag": True,
        "items": [10, 20, 30],
        "user": {"name": "Ada", "tags": ["admin", "ops"]},
        "nothing": None,
        "_private": "ok",
        "odd key": 1,
    },
    "steps": {"fetch": {"result": {"rows": [{"id": 7}], "count": 1}}},
    "item": {"id": "a1"},
    "index": 2,
}


def ev(text: str, context: dict[str, Any] = CONTEXT) -> Any:
    return compile_expression(text).evaluate(context)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("-2.5", -2.5),
        ("'a'", "a"),
        ('"a"', "a"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("True and None", None),
        ("workload.n", 3),
        ("workload['n']", 3),
        ("workload['odd key']", 1),
        ("workload._private", "ok"),
        ("workload.items[0]", 10),
        ("workload.items[-1]", 30),
        ("workload.items[index]", 30),
        ("workload.user.tags[1]", "ops"),
        ("steps.fetch.result.rows[0].id", 7),
        ("item.id", "a1"),
        ("index", 2),
        ("workload.n + 1", 4),
        ("workload.n - 5", -2),
        ("workload.n * 2", 6),
        ("workload.n / 2", 1.5),
        ("workload.n % 2", 1),
        ("workload.s + '!'", "Hello!"),
        ("workload.items + [40]", [10, 20, 30, 40]),
        ("'ab' * 2", "abab"),
        ("2 * [0]", [0, 0]),
        ("-workload.n", -3),
        ("+workload.f", 1.5),
        ("workload.n == 3", True),
        ("workload.n != 3", False),
        ("1 < workload.n <= 3", True),
        ("1 < workload.n < 3", False),
        ("'b' > 'a'", True),
        ("[1, 2] < [1, 3]", True),
        ("20 in workload.items", True),
        ("20 not in workload.items", False),
        ("'ell' in workload.s", True),
        ("'name' in workload.user", True),
        ("'x' in workload.missing", False),
        ("workload.flag and workload.n", 3),
        ("workload.nothing or 'default'", "default"),
        ("not workload.flag", False),
        ("not workload.missing", True),
        ("[workload.n, 'x', null]", [3, "x", None]),
        ("(1, 2)", [1, 2]),
        ("len(workload.items)", 3),
        ("len(workload.s)", 5),
        ("len(workload.user)", 2),
        ("len(workload.missing)", 0),
        ("lower(workload.s)", "hello"),
        ("upper(workload.user.name)", "ADA"),
        ("lower(workload.missing)", None),
        ("str(workload.n)", "3"),
        ("str(workload.user.tags)", '["admin","ops"]'),
        ("str(null)", "null"),
        ("int('42')", 42),
        ("int(3.9)", 3),
        ("float('2.5')", 2.5),
        ("float(2)", 2.0),
        ("bool(workload.items)", True),
        ("bool('')", False),
        ("min(workload.items)", 10),
        ("max(3, 1.5, 2)", 3),
        ("max(['b', 'a'])", "b"),
        ("contains(workload.user.tags, 'ops')", True),
        ("contains(workload.missing, 'ops')", False),
        ("startswith(workload.s, 'He')", True),
        ("endswith(workload.s, 'x')", False),
        ("startswith(workload.missing, 'x')", False),
        ("(workload.n + 1) * 2 == 8 and len(steps.fetch.result.rows) == 1", True),
    ],
)
def test_accepted(text: str, expected: Any) -> None:
    result = ev(text)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "text",
    [
        "workload.missing",
        "workload.missing.deeper.still",
        "workload['missing']",
        "workload.items[3]",
        "workload.items[-4]",
        "workload.items['0']",
        "workload.user[0]",
        "workload.n.digits",
        "workload.s[0]",
        "workload.nothing.x",
        "steps.unknown.result",
        "workload.items[workload.missing]",
    ],
)
def test_missing_keys_evaluate_to_none(text: str) -> None:
    assert ev(text) is None


def test_roots_missing_from_the_context_are_none() -> None:
    assert compile_expression("item").evaluate({}) is None
    assert compile_expression("workload.a == null").evaluate({}) is True


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("__import__('os')", "call to '__import__' is not allowed", 1),
        ("().__class__", "dunder attribute '__class__' is not allowed", 1),
        ("workload.__dict__", "dunder attribute '__dict__' is not allowed", 1),
        ("workload.a.__class__.__mro__", "dunder attribute '__mro__' is not allowed", 1),
        ("lambda: 1", "lambda is not allowed", 1),
        ("[x for x in workload.items]", "list comprehension is not allowed", 1),
        ("{x for x in workload.items}", "set comprehension is not allowed", 1),
        ("{k: 1 for k in workload}", "dict comprehension is not allowed", 1),
        ("len(x for x in workload.items)", "generator expression is not allowed", 4),
        ("open('x')", "call to 'open' is not allowed", 1),
        ("getattr(workload, 'n')", "call to 'getattr' is not allowed", 1),
        ("eval('1')", "call to 'eval' is not allowed", 1),
        ("'a'.upper", "attribute 'upper' on a value that is not a path", 1),
        ("'a'.upper()", "method call is not allowed", 1),
        ("workload.s.lower()", "method call is not allowed", 1),
        ("foo.bar", "unknown name 'foo'", 1),
        ("foo[0]", "unknown name 'foo'", 1),
        ("foo", "unknown name 'foo'", 1),
        ("1 + os", "unknown name 'os'", 5),
        ("true.x", "attribute 'x' on a value that is not a path", 1),
        ("[1][0]", "subscript on a value that is not a path", 1),
        ("f'{workload.n}'", "f-string is not allowed", 1),
        ("f'plain'", "f-string is not allowed", 1),
        ("len(*workload.items)", "starred expression is not allowed", 5),
        ("(x := 1)", "assignment expression ':=' is not allowed", 2),
        ("1 if workload.flag else 2", "conditional expression", 1),
        ("{'a': 1}", "dict literal is not allowed", 1),
        ("{1}", "set literal is not allowed", 1),
        ("workload.items[0:2]", "subscript key must be", 16),
        ("workload.items[1 + 1]", "subscript key must be", 16),
        ("2 ** 64", "operator '**' is not allowed", 1),
        ("7 // 2", "operator '//' is not allowed", 1),
        ("1 << 2", "operator '<<' is not allowed", 1),
        ("~1", "operator '~' is not allowed", 1),
        ("workload is None", "comparison 'is' is not allowed", 1),
        ("len(workload.items, 1)", "len() takes 1 argument(s), got 2", 1),
        ("contains(workload.items)", "contains() takes 2 argument(s), got 1", 1),
        ("min()", "min() takes at least 1 argument(s), got 0", 1),
        ("len(obj=workload)", "keyword argument to len() is not allowed", 5),
        ("b'x'", "bytes literal is not allowed", 1),
        ("1j", "complex literal is not allowed", 1),
        ("...", "ellipsis literal is not allowed", 1),
        ("steps.(x)", "unexpected '('", 7),
        ("workload.n ==", "unexpected end of expression", 14),
        ("len(workload.n", "'(' was never closed", 4),
        ("  workload.é + (", "'(' was never closed", 16),
        ("é + zz", "unknown name 'é'", 1),
        ("'é' + zz", "unknown name 'zz'", 7),
        ("await workload", "await is not allowed", 1),
        ("import os", "unexpected 'import'", 1),
        ("a; b", "unexpected ';'", 2),
    ],
)
def test_rejected(text: str, message: str, column: int | None) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(text)
    assert message in str(info.value)
    if column is not None:
        assert info.value.column == column
        assert str(info.value).endswith(f"at column {column}")


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_is_rejected(text: str) -> None:
    with pytest.raises(ExpressionError, match="empty expression"):
        compile_expression(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(ExpressionError, match="must be a string"):
        compile_expression(123)  # type: ignore[arg-type]


def test_loop_variable_names_are_opt_in() -> None:
    with pytest.raises(ExpressionError, match="unknown name 'user'"):
        compile_expression("user.name")
    names = frozenset({"workload", "steps", "item", "index", "user"})
    assert compile_expression("user.name", names=names).evaluate({"user": {"name": "Ada"}}) == "Ada"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps.fetch.result.rows", [("steps", "fetch", 1)]),
        ("steps['fetch'].result", [("steps", "fetch", 1)]),
        ("  steps[0]", [("steps", 0, 3)]),
        ("item[-1]", [("item", -1, 1)]),
        ("steps[workload.which].result", [("steps", None, 1), ("workload", "which", 7)]),
        ("len(steps) > index and item", [("steps", None, 5), ("index", None, 14), ("item", None, 24)]),
        ("workload.a == null or true", [("workload", "a", 1)]),
        ("[steps.b,\n steps.a]", [("steps", "b", 2), ("steps", "a", 12)]),
        ("1 + 2", []),
    ],
)
def test_references_list_roots_first_keys_and_columns(text: str, expected: list[tuple[str, Any, int]]) -> None:
    references = compile_expression(text).references()
    assert [(r.root, r.key, r.column) for r in references] == expected


def test_length_bound() -> None:
    compile_expression("1" * MAX_LENGTH)
    with pytest.raises(ExpressionError, match="more than 1000"):
        compile_expression("1" * (MAX_LENGTH + 1))


def test_node_bound() -> None:
    compile_expression("+".join(["1"] * 100))  # 199 nodes
    with pytest.raises(ExpressionError, match="syntax nodes, more than 200"):
        compile_expression("+".join(["1"] * 101))


def test_deep_nesting_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        compile_expression("(" * 300 + "1" + ")" * 300)
    with pytest.raises(ExpressionError):
        compile_expression("not " * 240 + "1")


@pytest.mark.parametrize(
    ("text", "context"),
    [
        ("'x' * 100001", {}),
        ("[0] * 100001", {}),
        ("workload.s * 2", {"workload": {"s": "x" * 60_000}}),
        ("workload.s + workload.s", {"workload": {"s": "x" * 60_000}}),
        ("workload.l + workload.l", {"workload": {"l": [0] * 60_000}}),
        ("str([workload.s] * 100000)", {"workload": {"s": "x" * 1000}}),
    ],
)
def test_result_size_bound(text: str, context: dict[str, Any]) -> None:
    with pytest.raises(ExpressionError, match=str(MAX_SIZE)):
        compile_expression(text).evaluate(context)


def test_size_bound_allows_exactly_the_cap() -> None:
    assert len(ev("'x' * 100000")) == MAX_SIZE
    assert ev("'x' * -1") == ""


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("workload.s < 1", "cannot compare str < int", 1),
        ("workload.missing > 3", "cannot compare null > int", 1),
        ("1 + (workload.missing + 1)", "unsupported operand types for +: null and int", 6),
        ("workload.s - 'x'", "unsupported operand types for -", 1),
        ("workload.n / 0", "division by zero", 1),
        ("workload.n % 0", "division by zero", 1),
        ("1e308 * 10", "not a finite number", 1),
        ("float('inf')", "not a finite number", 1),
        ("int('x')", "not an integer", 1),
        ("int(workload.user)", "int() of a dict", 1),
        ("len(workload.n)", "len() of a int", 1),
        ("lower(workload.n)", "lower() of a int", 1),
        ("min([])", "empty list", 1),
        ("min(workload.n)", "needs a list", 1),
        ("max(1, 'a')", "cannot compare", 1),
        ("1 in workload.s", "requires a str on the left", 1),
        ("1 in workload.n", "needs a str, list or dict", 1),
        ("-workload.s", "unary - of a str", 1),
        ("'ab' * 1.5", "cannot repeat a str by a float", 1),
        ("startswith(workload.s, 1)", "needs two str", 1),
    ],
)
def test_evaluation_errors(text: str, message: str, column: int) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(text)
    assert message in str(info.value)
    assert info.value.column == column


def test_short_circuit_skips_the_failing_operand() -> None:
    assert ev("false and 1 / 0") is False
    assert ev("workload.flag or 1 / 0") is True
    assert ev("1 > 2 > 1 / 0") is False


def test_compiled_expression_is_reused() -> None:
    expr = compile_expression("workload.n > 1")
    assert compile_expression("workload.n > 1") is expr
    assert [expr.evaluate({"workload": {"n": n}}) for n in (0, 2)] == [False, True]
    assert repr(expr) == "Expression('workload.n > 1')"


def test_evaluation_does_not_mutate_the_context() -> None:
    context = {"workload": {"items": [1]}}
    assert ev("workload.items + [2]", context) == [1, 2]
    assert ev("workload.items * 2", context) == [1, 1]
    assert context == {"workload": {"items": [1]}}


# --- never anything but a value or ExpressionError ------------------------

TOKENS = [
    "workload", "steps", "item", "index", "true", "null", ".", "n", "s", "items", "user", "name",
    "[", "]", "(", ")", "0", "-1", "1e308", "'x'", "'é'", ",", "+", "-", "*", "/", "%", "==", "<", ">=",
    " in ", " not ", " and ", " or ", "len", "lower", "str", "int", "min", "max", "contains",
    "__class__", "__import__", "lambda", ":", "{{", "}}", " ", "f'", "**", "if", "else", "=",
    "'os'", "open", "getattr", "[0]", "100000",
]  # fmt: skip


def _check_total(text: str) -> None:
    try:
        expr = compile_expression(text)
    except ExpressionError as e:
        assert isinstance(e.column, int | None)
        return
    try:
        value = expr.evaluate(CONTEXT)
    except ExpressionError:
        return
    msgspec.json.encode(value)  # only JSON data ever comes out


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(alphabet=string.printable, max_size=80))
def test_random_printable_text_compiles_or_raises_expression_error(text: str) -> None:
    _check_total(text)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=16).map("".join))
def test_random_token_soup_compiles_or_raises_expression_error(text: str) -> None:
    _check_total(text)


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(max_size=40))
def test_random_unicode_compiles_or_raises_expression_error(text: str) -> None:
    _check_total(text)
