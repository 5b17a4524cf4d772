"""Arg templates: a whole ``{{ expr }}`` keeps its type, text around it interpolates."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

from system_playbooks.orchestrate import errors, expressions, playbook, templates
from system_playbooks.orchestrate.expressions import MAX_SIZE, ExpressionError, to_text
from system_playbooks.orchestrate.templates import compile_template, render_template

CONTEXT: dict[str, Any] = {
    "workload": {"n": 7, "name": "Ada", "tags": ["a", "b"], "on": True, "none": None},
    "steps": {"fetch": {"result": {"rows": [1, 2]}}},
    "item": "x",
    "index": 0,
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ workload.n }}", 7),
        ("{{workload.n}}", 7),
        ("{{ workload.tags }}", ["a", "b"]),
        ("{{ workload.on }}", True),
        ("{{ workload.none }}", None),
        ("{{ workload.missing }}", None),
        ("{{ steps.fetch.result }}", {"rows": [1, 2]}),
        ("id-{{ workload.n }}", "id-7"),
        (" {{ workload.n }}", " 7"),
        ("{{ workload.n }}{{ workload.n }}", "77"),
        ("{{ workload.name }} has {{ len(workload.tags) }} tags", "Ada has 2 tags"),
        ("on={{ workload.on }} none={{ workload.none }}", "on=true none=null"),
        ("tags={{ workload.tags }}", 'tags=["a","b"]'),
        ("no template here", "no template here"),
        ("single { braces } and }} alone", "single { braces } and }} alone"),
        ("{{ '}' }}", "}"),
        (42, 42),
        (None, None),
        (1.5, 1.5),
    ],
)
def test_render(template: Any, expected: Any) -> None:
    result = render_template(template, CONTEXT)
    assert result == expected
    assert type(result) is type(expected)


def test_render_nested_values() -> None:
    value = {
        "a": ["{{ item }}", {"b": "#{{ index + 1 }}"}],
        "n": "{{ workload.n * 2 }}",
        "k": 3,
        "{{ not_a_template_key }}": "kept",
    }
    assert render_template(value, CONTEXT) == {
        "a": ["x", {"b": "#1"}],
        "n": 14,
        "k": 3,
        "{{ not_a_template_key }}": "kept",
    }
    assert value["n"] == "{{ workload.n * 2 }}"  # the input is never modified


def test_compiled_template_renders_many_times() -> None:
    template = compile_template({"id": "{{ item }}"})
    assert [template.render({"item": i}) for i in range(3)] == [{"id": 0}, {"id": 1}, {"id": 2}]


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ("{{ workload.a", "", "unclosed '{{' at column 1"),
        ("ok {{ 1 }} then {{ 2", "", "unclosed '{{' at column 17"),
        ({"h": {"x": "hi {{ __import__('os') }}"}}, ".h.x", "call to '__import__' is not allowed (functions: len"),
        ({"h": ["a", "{{ workload.__dict__ }}"]}, ".h[1]", "dunder attribute '__dict__' is not allowed at column 4"),
        ({"odd key": "{{ lambda: 1 }}"}, "['odd key']", "lambda is not allowed at column 4"),
        ("{{ }}", "", "empty expression"),
    ],
)
def test_compile_errors_name_the_path_and_column(value: Any, path: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_template(value)
    assert info.value.path == path
    assert message in str(info.value)


def test_expressions_are_listed_with_their_path_and_offset() -> None:
    template = compile_template({"a": "{{ steps.x }}", "b": ["k", "id-{{ item }}/{{index}}"], "c": {"d e": "{{ 1 }}"}})
    found = [(path, offset, e.text) for path, offset, e in template.expressions()]
    assert found == [(".a", 2, " steps.x "), (".b[1]", 5, " item "), (".b[1]", 16, "index"), (".c['d e']", 2, " 1 ")]
    # an expression's column plus its offset is the column in the template string
    _, offset, expression = list(template.expressions())[1]
    assert expression.references()[0].column + offset == len("id-{{ ") + 1


def test_render_errors_are_expression_errors_with_template_columns() -> None:
    with pytest.raises(ExpressionError, match=r"division by zero at column 8"):
        render_template("x = {{ 1 / 0 }}", {})


def test_nesting_is_bounded() -> None:
    value: Any = "{{ 1 }}"
    for _ in range(70):
        value = [value]
    with pytest.raises(ExpressionError, match="nested deeper than 64"):
        compile_template(value)


def test_interpolated_text_is_bounded() -> None:
    big = {"workload": {"s": "x" * 60_000}}
    with pytest.raises(ExpressionError, match=str(MAX_SIZE)):
        render_template("{{ workload.s }}{{ workload.s }}", big)
    assert render_template("{{ workload.s }}", big) == "x" * 60_000


def test_to_text() -> None:
    assert to_text("é") == "é"
    assert to_text(1.5) == "1.5"
    assert to_text({"a": None}) == '{"a":null}'
    with pytest.raises(ExpressionError, match="cannot render"):
        to_text(object())


@pytest.mark.parametrize("module", [errors, expressions, playbook, templates])
def test_doctests(module: Any) -> None:
    # pytest collects doctests only under locator/kernel/projector; these examples are checked here.
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert module is errors or result.attempted > 0
