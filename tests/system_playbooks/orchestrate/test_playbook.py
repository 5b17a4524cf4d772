"""Playbook loading and validation: every example loads, every bad case names the path of its error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from system_playbooks.orchestrate.playbook import (
    MAX_PLAYBOOK_BYTES,
    CallbackTool,
    HttpTool,
    NoopTool,
    Playbook,
    PlaybookError,
    Policy,
    PythonTool,
    load_playbook,
    parse_playbook,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples" / "playbooks").glob("*.yaml"))
BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))
POLICY = Policy(python_allow=("examples.tools.",), http_hosts=("api.example.com", "*.example.org"))


def doc(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"path": "t/p", "version": 1, "steps": list(steps), **top}


def noop(name: str, *next_steps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": {"kind": "noop"}, "next": [{"step": s} for s in next_steps], **extra}


def rejects(data: dict[str, Any], *, policy: Policy = POLICY) -> PlaybookError:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(data, policy=policy)
    return info.value


def test_examples_are_all_there() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"linear", "when", "loop", "parallel", "retry", "on_error", "callback"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads(path: Path) -> None:
    playbook = load_playbook(path, policy=POLICY)
    # `linear-v2.yaml` is version 2 of examples/linear (the README's `replay --check` tour).
    name, _, version = path.stem.partition("-v")
    assert (playbook.path, playbook.version) == (f"examples/{name.replace('_', '-')}", int(version or 1))
    assert playbook.start == playbook.steps[0].name
    again = parse_playbook(msgspec.to_builtins(playbook), policy=POLICY)  # the catalog may store it as JSON
    assert again == playbook


def test_examples_need_the_python_allow_list() -> None:
    with pytest.raises(PlaybookError, match=r"^steps\[0\]\.tool\.call: call 'examples\.tools\.flaky:fail_until'"):
        load_playbook(REPO / "examples" / "playbooks" / "retry.yaml", policy=Policy())


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message prefix>'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_every_bad_playbook_is_rejected_with_its_path(path: Path) -> None:
    expected = _expected(path)
    with pytest.raises(PlaybookError) as info:
        load_playbook(path, policy=POLICY)
    assert str(info.value).startswith(expected)
    if info.value.path:
        assert expected.startswith(f"{info.value.path}: ")


def test_bad_cases_cover_the_acceptance_list() -> None:
    assert {p.stem for p in BAD} >= {
        "unknown_tool",
        "missing_step",
        "cycle",
        "bad_when",
        "python_call",
        "http_host",
        "duplicate",
        "unreachable",
        "step_typo_template",
        "step_typo_when",
        "step_typo_loop",
        "loop_var_outside",
    }


def test_loaded_structure_and_defaults() -> None:
    playbook = load_playbook(REPO / "examples" / "playbooks" / "loop.yaml", policy=POLICY)
    square = playbook.step("square")
    assert square.loop is not None and (square.loop.over, square.loop.as_) == ("workload.items", "n")
    assert isinstance(square.tool, PythonTool) and square.tool.call == "examples.tools.math:multiply"
    assert playbook.workload == {"items": [1, 2, 3, 4, 5]}
    total = playbook.step("total")
    assert (total.retry, total.timeout, total.on_error, total.join, total.next) == (None, None, None, (), ())
    with pytest.raises(KeyError):
        playbook.step("nope")
    with pytest.raises(AttributeError):
        playbook.version = 2  # type: ignore[misc]


def test_tool_kinds_decode_to_their_structs() -> None:
    playbook = parse_playbook(
        doc(
            noop("a", "b"),
            {"name": "b", "tool": {"kind": "callback"}, "next": [{"step": "c"}]},
            {"name": "c", "tool": {"kind": "http", "url": "https://api.example.com/x/{{ workload.id }}"}},
        ),
        policy=POLICY,
    )
    tools = [s.tool for s in playbook.steps]
    assert isinstance(tools[0], NoopTool)
    assert isinstance(tools[1], CallbackTool) and tools[1].timeout == 300.0
    assert isinstance(tools[2], HttpTool) and (tools[2].method, tools[2].timeout) == ("GET", 30.0)


# --- policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.example.com/v1", True),
        ("http://API.EXAMPLE.COM:8443/v1?q=1", True),
        ("https://api.example.com./v1", True),
        ("https://x.example.org/", True),
        ("https://a.b.example.org/{{ workload.id }}", True),
        ("https://example.org/", False),  # a wildcard does not cover the apex
        ("https://evilexample.org/", False),
        ("https://api.example.com.evil.net/", False),
        ("https://api.example.com@evil.net/", False),
        ("https://other.example.com/", False),
    ],
)
def test_http_host_allow_list(url: str, allowed: bool) -> None:
    data = doc({"name": "a", "tool": {"kind": "http", "url": url}})
    if allowed:
        parse_playbook(data, policy=POLICY)
    else:
        assert rejects(data).path == "steps[0].tool.url"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://api.example.com/x", "expected http(s)://host/"),
        ("api.example.com/x", "expected http(s)://host/"),
        ("https:///x", "expected http(s)://host/"),
        ("https://api.example.com:99999/", "invalid url"),
        ("https://{{ workload.host }}/", "must not be templated"),
        ("https://api.example.com{{ workload.suffix }}", "must not be templated"),
        ("https://api.example.com/{{ lambda: 1 }}", "lambda is not allowed"),
    ],
)
def test_http_url_must_name_a_static_host(url: str, message: str) -> None:
    error = rejects(doc({"name": "a", "tool": {"kind": "http", "url": url}}))
    assert error.path == "steps[0].tool.url"
    assert message in str(error)


def test_http_headers_and_body_are_templates() -> None:
    tool = {"kind": "http", "url": "https://api.example.com/", "headers": {"X-Id": "{{ item.__class__ }}"}}
    assert "steps[0].tool.headers.X-Id: dunder attribute" in str(rejects(doc({"name": "a", "tool": tool})))
    tool = {"kind": "http", "url": "https://api.example.com/", "body": {"rows": ["{{ open('x') }}"]}}
    assert str(rejects(doc({"name": "a", "tool": tool}))).startswith("steps[0].tool.body.rows[0]: call to 'open'")


def test_default_policy_rejects_python_and_http() -> None:
    python = doc({"name": "a", "tool": {"kind": "python", "call": "examples.tools.math:multiply"}})
    http = doc({"name": "a", "tool": {"kind": "http", "url": "https://api.example.com/"}})
    assert "allowed module prefixes: none" in str(rejects(python, policy=Policy()))
    assert "allowed hosts: none" in str(rejects(http, policy=Policy()))
    noop_only = parse_playbook(doc(noop("a")), policy=Policy())
    assert noop_only.start == "a"


@pytest.mark.parametrize(
    ("prefix", "call", "allowed"),
    [
        ("examples.tools.", "examples.tools.math:add", True),
        ("examples.tools.", "examples.tools:add", False),
        ("examples.tools", "examples.tools:add", True),
        ("examples.tools", "examples.tools.math:add", True),
        ("examples.tools", "examples.toolsmith:add", False),
        ("examples.tools.", "os:system", False),
    ],
)
def test_python_allow_list_prefixes(prefix: str, call: str, allowed: bool) -> None:
    assert Policy(python_allow=(prefix,)).allows_call(call) is allowed


@pytest.mark.parametrize(
    "call",
    ["examples.tools.math", "examples.tools.math:", "examples.tools.math:_private", "examples.tools..m:f", "a:b:c"],
)
def test_python_call_must_be_module_colon_function(call: str) -> None:
    error = rejects(doc({"name": "a", "tool": {"kind": "python", "call": call}}))
    assert str(error).startswith(f"steps[0].tool.call: invalid call {call!r}")


# --- graph ----------------------------------------------------------------


def test_long_chain_loads_and_its_cycle_is_found_without_recursion() -> None:
    steps = [noop(f"s{i}", f"s{i + 1}") for i in range(2999)] + [noop("s2999")]
    assert len(parse_playbook(doc(*steps), policy=POLICY).steps) == 3000
    steps[-1] = noop("s2999", "s1500")
    error = rejects(doc(*steps))
    assert error.path == "steps[2999].next[0].step"
    assert str(error).startswith("steps[2999].next[0].step: cycle s1500 -> s1501 ->")


def test_self_arc_is_a_cycle() -> None:
    assert str(rejects(doc(noop("a", "a")))).startswith("steps[0].next[0].step: cycle a -> a")


def test_diamond_without_join_is_not_a_cycle() -> None:
    playbook = parse_playbook(doc(noop("a", "b", "c"), noop("b", "d"), noop("c", "d"), noop("d")), policy=POLICY)
    assert [s.name for s in playbook.steps] == ["a", "b", "c", "d"]


def test_steps_reached_only_through_on_error_are_reachable() -> None:
    parse_playbook(doc(noop("a", on_error="handler"), noop("handler")), policy=POLICY)


def test_loop_variable_is_scoped_to_its_step_tool() -> None:
    step = noop("a", loop={"over": "workload.rows", "as": "row"})
    step["tool"] = {"kind": "noop", "result": "{{ row.id }}-{{ index }}"}
    step["next"] = [{"step": "b", "when": "row"}]
    error = rejects(doc(step, noop("b")))
    assert str(error).startswith("steps[0].next[0].when: unknown name 'row'")


# --- names: steps.<name> and loop variables ---------------------------------


def linear(result: Any, *, when: str | None = None) -> dict[str, Any]:
    """Steps first -> second, ``second``'s result templated, the arc optionally guarded."""
    arc: dict[str, Any] = {"step": "second"} if when is None else {"step": "second", "when": when}
    first = {"name": "first", "tool": {"kind": "noop", "result": 1}, "next": [arc]}
    return doc(first, {"name": "second", "tool": {"kind": "noop", "result": result}})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            linear("{{ steps.frist.result }} then second"),
            "steps[1].tool.result: unknown step 'frist' (did you mean 'first'?) at column 4",
        ),
        (
            linear({"rows": ["x", "a {{ steps['secnd'] }}"]}),
            "steps[1].tool.result.rows[1]: unknown step 'secnd' (did you mean 'second'?) at column 6",
        ),
        (
            linear(None, when="steps.first.result and steps.frist.result > 1"),
            "steps[0].next[0].when: unknown step 'frist' (did you mean 'first'?) at column 24",
        ),
        (
            doc(noop("a", loop={"over": "steps.nothing_like_it.result"})),
            "steps[0].loop.over: unknown step 'nothing_like_it' (not a step of this playbook) at column 1",
        ),
        (
            doc({"name": "a", "tool": {"kind": "python", "call": "examples.tools.math:add", "args": {"x": "{{ steps[0] }}"}}}),
            "steps[0].tool.args.x: unknown step 0 (not a step of this playbook) at column 4",
        ),
        (
            doc({"name": "a", "tool": {"kind": "http", "url": "https://api.example.com/{{ steps.b.result }}"}}),
            "steps[0].tool.url: unknown step 'b' (not a step of this playbook) at column 28",
        ),
        (
            doc({"name": "a", "tool": {"kind": "http", "url": "https://api.example.com/", "headers": {"X": "{{ steps.aa }}"}}}),
            "steps[0].tool.headers.X: unknown step 'aa' (did you mean 'a'?) at column 4",
        ),
    ],
)
def test_a_misspelt_step_name_is_refused_with_its_path(data: dict[str, Any], expected: str) -> None:
    error = rejects(data)
    assert str(error) == expected
    assert error.path == expected.partition(": ")[0]


def test_step_references_that_name_real_steps_or_are_computed_load() -> None:
    data = linear(
        ["{{ steps.first.result }}", "{{ steps['second'] }}", "{{ steps[workload.which].result }}", "{{ len(steps) }}"],
        when="steps.first.status == 'COMPLETED' and workload.anything.at.all == null",
    )
    playbook = parse_playbook(data, policy=POLICY)
    assert [s.name for s in playbook.steps] == ["first", "second"]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"name": "a", "tool": {"kind": "noop", "result": "{{ item }}"}},
            "steps[0].tool.result: unknown name 'item' (a loop variable, defined only in the tool of a step with a loop)",
        ),
        (
            {"name": "a", "tool": {"kind": "noop", "result": "#{{ index }}"}},
            "steps[0].tool.result: unknown name 'index' (a loop variable, defined only in the tool of a step with a loop)",
        ),
        (
            {"name": "a", "loop": {"over": "workload.rows", "as": "row"}, "tool": {"kind": "noop", "result": "{{ item }}"}},
            "steps[0].tool.result: unknown name 'item' (the loop variable of step 'a' is 'row')",
        ),
        (
            {"name": "a", "loop": {"over": "item"}, "tool": {"kind": "noop"}},
            "steps[0].loop.over: unknown name 'item' (step 'a' defines it for its tool only, not for its loop.over or next)",
        ),
        (
            noop("a", "b", loop={"over": "workload.rows"}) | {"next": [{"step": "b", "when": "index > 1"}]},
            "steps[0].next[0].when: unknown name 'index' (step 'a' defines it for its tool only",
        ),
    ],
)
def test_a_loop_variable_outside_its_loop_step_tool_is_refused(step: dict[str, Any], expected: str) -> None:
    steps = [step, noop("b")] if step.get("next") else [step]
    assert str(rejects(doc(*steps))).startswith(expected)


def test_a_loop_variable_of_another_step_is_named() -> None:
    loop = noop("a", "b", loop={"over": "workload.rows", "as": "row"})
    error = rejects(doc(loop, {"name": "b", "tool": {"kind": "noop", "result": "{{ row.id }}"}}))
    assert str(error) == (
        "steps[1].tool.result: unknown name 'row' (the loop variable of step 'a', defined only in that step's tool) "
        "at column 4"
    )


def test_a_loop_step_tool_sees_its_variable_and_index() -> None:
    step = noop("a", loop={"over": "workload.rows", "as": "row"})
    step["tool"] = {"kind": "noop", "result": ["{{ row.id }}-{{ index }}", "{{ workload[row.key] }}", "{{ steps.a }}"]}
    assert parse_playbook(doc(step), policy=POLICY).steps[0].loop is not None
    default = noop("a", loop={"over": "workload.rows"})
    default["tool"] = {"kind": "noop", "result": "{{ item }} #{{ index }}"}
    parse_playbook(doc(default), policy=POLICY)


def test_other_expression_errors_come_first_and_list_the_names_in_scope() -> None:
    error = rejects(linear("{{ bogus }}"))
    assert str(error) == "steps[1].tool.result: unknown name 'bogus' (use one of steps, workload) at column 4"
    error = rejects(linear("{{ item.__class__ }}"))
    assert str(error).startswith("steps[1].tool.result: dunder attribute '__class__' is not allowed")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected `object`, got `array`"),
        ({"path": "a", "version": 1}, "object missing required field `steps`"),
        (doc(noop("a"), version=0), "version: expected `int` >= 1"),
        (doc({"name": "a"}), "steps[0]: object missing required field `tool`"),
        (doc({"name": "a", "tool": "noop"}), "steps[0].tool: expected `object`, got `str`"),
        (doc(noop("a", timeout=0)), "steps[0].timeout: expected `float` > 0"),
        (
            doc({"name": "a", "tool": {"kind": "noop", "extra": 1}}),
            "steps[0].tool: object contains unknown field `extra`",
        ),
        (doc(noop("a"), extra=1), "object contains unknown field `extra`"),
        (
            doc({"name": "a", "tool": {"kind": "callback", "timeout": -1}}),
            "steps[0].tool.timeout: expected `float` > 0",
        ),
        (
            doc({"name": "a", "tool": {"kind": "wasm", "plugin": "../x"}}),
            "steps[0].tool.plugin: expected `str` matching",
        ),
        (doc(noop("a", next=[{"when": "true"}])), "steps[0].next[0]: object missing required field `step`"),
    ],
)
def test_structural_errors_name_their_path(data: Any, message: str) -> None:
    assert str(rejects(data)).startswith(message)


# --- loading ----------------------------------------------------------------

LINEAR = (REPO / "examples" / "playbooks" / "linear.yaml").read_text(encoding="utf-8")


def test_load_accepts_text_bytes_and_paths() -> None:
    from_text = load_playbook(LINEAR, policy=POLICY)
    assert load_playbook(LINEAR.encode(), policy=POLICY) == from_text
    assert load_playbook(REPO / "examples" / "playbooks" / "linear.yaml", policy=POLICY) == from_text
    assert isinstance(from_text, Playbook)


def test_load_errors() -> None:
    with pytest.raises(PlaybookError, match="cannot read playbook"):
        load_playbook(REPO / "nope.yaml", policy=POLICY)
    with pytest.raises(PlaybookError, match="not UTF-8"):
        load_playbook(b"\xff\xfe", policy=POLICY)
    with pytest.raises(PlaybookError, match=f"more than {MAX_PLAYBOOK_BYTES}"):
        load_playbook("#" * (MAX_PLAYBOOK_BYTES + 1), policy=POLICY)
    with pytest.raises(PlaybookError, match=r"^expected `object`, got `null`"):
        load_playbook("", policy=POLICY)


def test_yaml_dates_stay_strings() -> None:
    playbook = load_playbook(LINEAR + "workload: {day: 2026-01-01, n: 1, ok: true}\n", policy=POLICY)
    assert playbook.workload == {"day": "2026-01-01", "n": 1, "ok": True}
