"""The tool registry: entry points in, kinds out (broken ones named with their reason); the operator's
allow-list at register time and run time; the nats and duckdb kinds' checks and runners in process."""

from __future__ import annotations

import asyncio
import re
from importlib.metadata import EntryPoint, distribution
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest

from kernel.errors import ConfigError
from projector.results import ResultKey, ResultStore
from system_playbooks.orchestrate.errors import ExpressionError
from system_playbooks.orchestrate import playbook as playbook_module
from system_playbooks.orchestrate.catalog import policy_from_env
from worker.tools.duckdb_tool import input_table
from system_playbooks.orchestrate.playbook import (
    DuckdbTool,
    NatsTool,
    PlaybookError,
    Policy,
    parse_playbook,
    reserved_subject,
    subject_matches,
)
from worker.tools.registry import (
    BUILTIN_KINDS,
    ENTRY_POINT_GROUP,
    Registry,
    ToolConfig,
    ToolKind,
    load_registry,
    registry,
)
from worker.tools.runner import ToolContext, ToolError, run_tool

ALLOWED = ", ".join(BUILTIN_KINDS)


def point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


class Shout(ToolConfig, frozen=True, tag="shout"):
    text: str


class ShoutKind(ToolKind):
    name = "shout"
    config = Shout
    templated = ("text",)

    async def run(self, config: ToolConfig, ctx: Any) -> Any:
        assert isinstance(config, Shout)
        return config.text.upper()


class Whisper(ToolConfig, frozen=True, tag="whisper"):
    text: str


class Misnamed(ToolKind):
    name = "other"
    config = Shout


class Mistagged(ToolKind):
    name = "whisper"
    config = Shout


class BadTemplate(ToolKind):
    name = "shout"
    config = Shout
    templated = ("txt",)


HERE = __name__


# --------------------------------------------------------------------------- loading


def test_the_built_in_kinds_are_this_projects_entry_points() -> None:
    points = {p.name: p.value for p in distribution("noetl-edge").entry_points if p.group == ENTRY_POINT_GROUP}
    assert sorted(points) == sorted(BUILTIN_KINDS)
    assert all(value.startswith("worker.tools.kinds:") for value in points.values())
    installed = registry()
    assert set(BUILTIN_KINDS) <= set(installed.kinds) and not (set(BUILTIN_KINDS) & set(installed.broken))
    assert [installed.kind(k).on_worker for k in ("callback", "playbook", "noop")] == [False, False, True]


def test_a_kind_loads_from_its_entry_point() -> None:
    loaded = load_registry([point("shout", f"{HERE}:ShoutKind")])
    assert isinstance(loaded.kind("shout"), ShoutKind) and loaded.broken == {}


@pytest.mark.parametrize(("value", "reason"), [
    ("no_such_module_anywhere:Kind", "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    (f"{HERE}:NoSuchClass", "AttributeError"),
    (f"{HERE}:Whisper", "is not a ToolKind subclass"),
    (f"{HERE}:Misnamed", "Misnamed.name is 'other', not the entry point's 'shout'"),
    (f"{HERE}:BadTemplate", "BadTemplate.templated names 'txt', not a field of Shout"),
])  # fmt: skip
def test_a_broken_entry_point_is_named_with_its_reason(value: str, reason: str) -> None:
    loaded = load_registry([point("shout", value), point("noop", "worker.tools.kinds:NoopKind")])
    assert "noop" in loaded.kinds and "shout" not in loaded.kinds  # one broken kind harms no other
    with pytest.raises(ConfigError) as info:
        loaded.kind("shout")
    assert str(info.value).startswith(f"tool kind 'shout' cannot be loaded: entry point shout = {value}: ")
    assert reason in str(info.value)
    with pytest.raises(ConfigError, match=r"^NOETL_TOOL_KINDS: tool kind 'shout' cannot be loaded"):
        loaded.check_allowed(["noop", "shout"])


def test_a_config_without_the_kinds_tag_is_refused() -> None:
    loaded = load_registry([point("whisper", f"{HERE}:Mistagged")])
    assert "Shout must be declared with tag='whisper' (it has tag='shout')" in loaded.broken["whisper"]


def test_two_packages_declaring_one_name_break_it() -> None:
    loaded = load_registry([point("shout", f"{HERE}:ShoutKind"), point("shout", f"{HERE}:BadTemplate")])
    assert loaded.broken["shout"] == f"declared twice ({HERE}:ShoutKind and {HERE}:BadTemplate)"
    assert "shout" not in loaded.kinds


# --------------------------------------------------------------------------- the allow-list


def test_policy_from_env_reads_the_kinds_and_the_subjects() -> None:
    assert policy_from_env({}).tool_kinds == BUILTIN_KINDS
    policy = policy_from_env({"NOETL_TOOL_KINDS": " noop, python ,noop", "NOETL_NATS_SUBJECTS": "a.*.c, b.>"})
    assert policy.tool_kinds == ("noop", "python") and policy.nats_subjects == ("a.*.c", "b.>")
    with pytest.raises(ConfigError, match="^NOETL_TOOL_KINDS: no tool kind 'shell' is installed"):
        policy_from_env({"NOETL_TOOL_KINDS": "noop,shell"})
    for bad in ("a..b", "a.>.b", "a.b*", "a b"):
        with pytest.raises(ConfigError, match=re.escape(f"NOETL_NATS_SUBJECTS: invalid subject pattern '{bad}'")):
            policy_from_env({"NOETL_NATS_SUBJECTS": bad})


def doc(*tools: dict[str, Any]) -> dict[str, Any]:
    steps = [{"name": f"s{i}", "tool": tool, "next": [{"step": f"s{i + 1}"}] if i + 1 < len(tools) else []}
             for i, tool in enumerate(tools)]  # fmt: skip
    return {"path": "t/kinds", "version": 1, "steps": steps}


def rejects(data: dict[str, Any], policy: Policy) -> str:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(data, policy=policy)
    return str(info.value)


def test_a_kind_the_operator_does_not_allow_is_refused_with_its_path() -> None:
    only_noop = Policy(tool_kinds=("noop",))
    assert rejects(doc({"kind": "noop"}, {"kind": "duckdb", "sql": "select 1"}), only_noop) == (
        "steps[1].tool.kind: tool kind 'duckdb' is not allowed by the operator (NOETL_TOOL_KINDS allows: noop)"
    )
    assert rejects(doc({"kind": "shell"}), only_noop) == "steps[0].tool.kind: unknown tool kind 'shell' (one of noop)"
    assert rejects(doc({"kind": ["noop"]}), Policy()) == f"steps[0].tool.kind: unknown tool kind ['noop'] (one of {ALLOWED})"
    assert rejects(doc({}), Policy()) == f"steps[0].tool.kind: missing tool kind (one of {ALLOWED})"


def test_a_kind_allowed_but_broken_or_missing_names_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Registry(kinds=registry().kinds, broken={"shout": "entry point shout = x:Y: ModuleNotFoundError: x"})
    monkeypatch.setattr(playbook_module, "registry", lambda: broken)
    policy = Policy(tool_kinds=("noop", "shout", "gone"))
    assert rejects(doc({"kind": "shout", "text": "a"}), policy) == (
        "steps[0].tool.kind: tool kind 'shout' cannot be loaded: entry point shout = x:Y: ModuleNotFoundError: x "
        "(NOETL_TOOL_KINDS allows it)"
    )
    assert rejects(doc({"kind": "gone"}), policy) == (
        "steps[0].tool.kind: no tool kind 'gone' is installed (no entry point 'gone' in group noetl_edge.tools) "
        "(NOETL_TOOL_KINDS allows it)"
    )


def test_a_third_party_config_validates_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = Registry(kinds={**registry().kinds, "shout": ShoutKind()}, broken={})
    monkeypatch.setattr(playbook_module, "registry", lambda: kinds)
    policy = Policy(tool_kinds=("noop", "shout"))
    assert rejects(doc({"kind": "shout", "text": 3}), policy) == "steps[0].tool.text: expected `str`, got `int`"
    assert rejects(doc({"kind": "shout", "text": "{{ nope }}"}), policy).startswith("steps[0].tool.text: unknown name")
    pb = parse_playbook(doc({"kind": "shout", "text": "hi {{ workload.x }}"}), policy=policy)
    assert pb.steps[0].tool == Shout(text="hi {{ workload.x }}")
    assert playbook_module.decode_playbook(msgspec.json.encode(pb)) == pb


async def test_a_worker_refuses_a_kind_the_operator_does_not_allow() -> None:
    ctx = ToolContext(execution_id="7", step="s", iteration=None, attempt=1, policy=Policy(tool_kinds=("python",)))
    with pytest.raises(ToolError) as info:
        await run_tool({"kind": "noop", "result": 1}, ctx)
    assert (info.value.type, info.value.message) == (
        "denied", "tool kind 'noop' is not allowed by the operator (NOETL_TOOL_KINDS allows: python)")


# --------------------------------------------------------------------------- nats


@pytest.mark.parametrize(("pattern", "subject", "matches"), [
    ("a.b", "a.b", True), ("a.*", "a.b", True), ("a.*", "a.b.c", False), ("a.>", "a.b.c", True),
    ("a.>", "a", False), (">", "x", True), ("*.b", "a.c", False),
])  # fmt: skip
def test_subject_patterns(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def test_the_runtimes_own_subjects_are_reserved() -> None:
    for subject in ("wal.0.t.p.1.step.exit", "cmd.3.shared", "dlq.0.x", "in.t.p.1.x", "ina.t.p.a.1.x",
                    "$JS.API.STREAM.LIST", "$KV.catalog.x", "_INBOX.abc", "$SYS.REQ.SERVER.PING"):  # fmt: skip
        assert reserved_subject(subject) is not None, subject
        assert not Policy(nats_subjects=(">",)).allows_subject(subject)
    assert reserved_subject("orders.wal") is None


def test_nats_register_time_checks() -> None:
    policy = Policy(nats_subjects=("orders.>", ">"))
    assert rejects(doc({"kind": "nats", "subject": "cmd.0.shared"}), policy) == (
        "steps[0].tool.subject: subject 'cmd.0.shared' is the runtime's own (cmd.>): a nats tool never publishes there"
    )
    assert rejects(doc({"kind": "nats", "subject": "orders.new"}), Policy()) == (
        "steps[0].tool.subject: subject 'orders.new' is not allowed by the operator policy (NOETL_NATS_SUBJECTS: none)"
    )
    assert rejects(doc({"kind": "nats"}), policy) == "steps[0].tool: object missing required field `subject`"
    assert rejects(doc({"kind": "nats", "subject": "a", "timeout": 0}), policy) == "steps[0].tool.timeout: expected `float` > 0.0"
    assert rejects(doc({"kind": "nats", "subject": "a..b"}), policy).startswith("steps[0].tool.subject: invalid subject")
    # A templated subject is checked when rendered (on the worker); its template is checked now.
    assert rejects(doc({"kind": "nats", "subject": "{{ nope }}"}), Policy()).startswith("steps[0].tool.subject: unknown name")
    pb = parse_playbook(doc({"kind": "nats", "subject": "orders.{{ workload.r }}", "data": {"x": "{{ workload.x }}"}}),
                        policy=Policy())  # fmt: skip
    assert pb.steps[0].tool == NatsTool(subject="orders.{{ workload.r }}", data={"x": "{{ workload.x }}"})


async def test_a_nats_step_is_checked_again_after_rendering() -> None:
    ctx = ToolContext(execution_id="7", step="s", iteration=None, attempt=1, policy=Policy(nats_subjects=(">",)))
    for subject, type_ in [("wal.1.t.p.1.x", "denied"), ("orders.new", "unsupported")]:
        with pytest.raises(ToolError) as info:
            await run_tool({"kind": "nats", "subject": subject, "data": 1}, ctx)
        assert info.value.type == type_, info.value.message  # unsupported: no NATS connection in this context


# --------------------------------------------------------------------------- duckdb


def test_duckdb_register_time_checks() -> None:
    def with_tables(tables: Any) -> dict[str, Any]:
        return doc({"kind": "noop", "result": [{"a": 1}]}, {"kind": "duckdb", "sql": "select * from s0", "tables": tables})

    assert rejects(with_tables(["s9"]), Policy()) == "steps[1].tool.tables[0]: unknown step 's9' (not a step of this playbook)"
    assert rejects(with_tables(["s1"]), Policy()) == "steps[1].tool.tables[0]: step 's1' cannot read its own result"
    assert rejects(with_tables(["s0", "s0"]), Policy()) == "steps[1].tool.tables[1]: step 's0' is listed twice"
    assert rejects(with_tables({"s0": {}}), Policy()).startswith("steps[1].tool.tables: tables lists the names")
    assert rejects(doc({"kind": "duckdb", "sql": ""}), Policy()) == "steps[0].tool.sql: expected `str` of length >= 1"
    assert parse_playbook(with_tables(["s0"]), policy=Policy()).steps[1].tool == DuckdbTool(sql="select * from s0",
                                                                                           tables=("s0",))


def test_input_tables() -> None:
    assert input_table([{"a": 1, "b": "x"}]).to_pylist() == [{"a": 1, "b": "x"}]
    assert input_table({"a": 1}).to_pylist() == [{"a": 1}]
    assert input_table(["x", "y"]).to_pylist() == [{"value": "x"}, {"value": "y"}]
    assert input_table(None).to_pylist() == [{"value": None}]


async def test_duckdb_reads_inline_and_stored_results(tmp_path: Path) -> None:
    store = ResultStore(f"file://{tmp_path}/objects")
    big = pa.table({"k": [i % 3 for i in range(1000)], "v": list(range(1000))})
    ref = (await asyncio.to_thread(store.put, ResultKey("t", "p", "7", "load", None, 1), big)).ref
    ctx = ToolContext(execution_id="7", step="q", iteration=None, attempt=1, policy=Policy(), results=store)
    tables = {"load": {"status": "COMPLETED", "result": None, "result_ref": ref},
              "names": {"status": "COMPLETED", "result": [{"k": 0, "n": "zero"}, {"k": 1, "n": "one"}], "result_ref": None}}
    sql = "select n, sum(v) as total, count(*) as c from load join names using (k) group by n order by n"
    result = await run_tool({"kind": "duckdb", "sql": sql, "tables": tables}, ctx)
    assert result == [{"n": "one", "total": sum(range(1, 1000, 3)), "c": 333},
                      {"n": "zero", "total": sum(range(0, 1000, 3)), "c": 334}]  # fmt: skip
    whole = await run_tool({"kind": "duckdb", "sql": "select v, v * 2.5 as w from load", "tables": tables}, ctx)
    assert isinstance(whole, pa.Table) or len(whole) == 1000  # small enough to come back as rows here
    for sql, type_, text in [
        ("select * from nowhere", "sql_error", "Table with name nowhere does not exist"),
        ("selec 1", "sql_error", "syntax error"),
        ("select * from read_text('/etc/hostname')", "sql_error", "disabled by configuration"),
    ]:
        with pytest.raises(ToolError) as info:
            await run_tool({"kind": "duckdb", "sql": sql, "tables": tables}, ctx)
        assert info.value.type == type_ and text in info.value.message, info.value.message
    with pytest.raises(ToolError) as info:
        await run_tool({"kind": "duckdb", "sql": "select 1", "tables": {"x": {"status": "FAILED"}}}, ctx)
    assert info.value.type == "bad_input" and "step 'x' has not completed" in info.value.message


def test_a_duckdb_command_carries_the_steps_results() -> None:
    kind = registry().kind("duckdb")
    steps = {"load": {"status": "COMPLETED", "result": None, "result_ref": "noetl://results/t/p/7/load/--1.feather",
                      "error": None}}  # fmt: skip
    tool = kind.render({"kind": "duckdb", "sql": "select 1", "tables": ["load"], "max_rows": 5}, lambda v: v, steps)
    assert tool["tables"] == {"load": {"status": "COMPLETED", "result": None,
                                       "result_ref": "noetl://results/t/p/7/load/--1.feather"}}  # fmt: skip
    assert msgspec.convert(tool, DuckdbTool).tables == tool["tables"]


def test_a_duckdb_command_too_large_for_the_command_stream_fails_the_step_instead() -> None:
    kind = registry().kind("duckdb")
    big = [{"pad": "x" * 1000, "i": i} for i in range(60)]  # each under an event's cap, together over a command's
    steps = {name: {"status": "COMPLETED", "result": big, "result_ref": None} for name in ("a", "b", "c")}
    with pytest.raises(ExpressionError, match=r"^tables: the inline results of a, b, c are \d+ bytes as JSON, more than"):
        kind.render({"kind": "duckdb", "sql": "select 1", "tables": ["a", "b", "c"]}, lambda v: v, steps)
