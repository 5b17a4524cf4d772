"""The built-in tool kinds, declared as entry points of group ``noetl_edge.tools`` in this project's pyproject.toml.

Each is a :class:`~worker.tools.registry.ToolKind` like a
third party's: its config (defined in :mod:`system_playbooks.orchestrate.playbook`),
its templated fields, its register-time checks and its runner. ``callback`` and
``playbook`` are carried out by the orchestrator itself (``on_worker = False``):
they are registry rows for validation, and a data worker refuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from system_playbooks.orchestrate.errors import ExpressionError, PlaybookError
from system_playbooks.orchestrate.playbook import (
    CALL_RE,
    CREDENTIAL_NAME_RE,
    CallbackTool,
    DuckdbTool,
    HttpTool,
    NatsTool,
    NoopTool,
    PlaybookTool,
    PythonTool,
    WasmTool,
    _check_alias,
    _check_auth,
    _check_child_name,
    _check_url,
    reserved_subject,
    subject_matches,
    subject_problem,
)
from worker.tools.registry import KindCheck, ToolConfig, ToolKind
from worker.tools.runner import ToolContext, ToolError, builtins_result, run_http, run_python

__all__ = ["MAX_INLINE_TABLES", "CallbackKind", "DuckdbKind", "HttpKind", "NatsKind", "NoopKind", "PlaybookKind",
           "PythonKind", "WasmKind"]

# What a duckdb command may carry of earlier steps' inline results (each is at most an event's payload cap;
# a command must stay under the CMD streams' max_msg_size, 256 KiB by default).
MAX_INLINE_TABLES: Final = 160 * 1024


class NoopKind(ToolKind):
    """``tool: noop``: the step's result is the rendered ``result``."""

    name = "noop"
    config = NoopTool
    templated = ("result",)

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        assert isinstance(config, NoopTool)
        return builtins_result(config.result)


class PythonKind(ToolKind):
    """``tool: python``: a callable under a module prefix the operator allows (``NOETL_PYTHON_ALLOW``)."""

    name = "python"
    config = PythonTool
    templated = ("args",)

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        assert isinstance(config, PythonTool)
        for name, alias in config.credentials.items():
            if CREDENTIAL_NAME_RE.fullmatch(name) is None:
                raise at.error(f"invalid credential name {name!r}: an identifier (letters, digits, '_'), "
                               "at most 63 characters", "credentials")  # fmt: skip
            _check_alias(alias, f"{at.path}.credentials.{name}")
        if CALL_RE.fullmatch(config.call) is None:
            raise at.error(f"invalid call {config.call!r}: expected 'package.module:function'", "call")
        if not at.policy.allows_call(config.call):
            allowed = ", ".join(at.policy.python_allow) or "none"
            raise at.error(f"call {config.call!r} is not allowed by the operator policy (allowed module prefixes: "
                           f"{allowed})", "call")  # fmt: skip

    def credentials(self, config: ToolConfig) -> list[tuple[str, str]]:
        assert isinstance(config, PythonTool)
        return [(f"credentials.{name}", alias) for name, alias in config.credentials.items()]

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        assert isinstance(config, PythonTool)
        return builtins_result(await run_python(config, ctx))


class HttpKind(ToolKind):
    """``tool: http``: one request to a host the operator allows (``NOETL_HTTP_HOSTS``)."""

    name = "http"
    config = HttpTool
    templated = ("url", "headers", "body")

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        assert isinstance(config, HttpTool)
        if config.auth is not None:
            _check_auth(config.auth, config.headers, f"{at.path}.auth")
        _check_url(config.url, f"{at.path}.url", at.policy)

    def credentials(self, config: ToolConfig) -> list[tuple[str, str]]:
        assert isinstance(config, HttpTool)
        return [] if config.auth is None else [("auth.credential", config.auth.credential)]

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        assert isinstance(config, HttpTool)
        return await run_http(config, ctx)


class WasmKind(ToolKind):
    """``tool: wasm``: the project's plug-in from the registry, under the user capability ring."""

    name = "wasm"
    config = WasmTool
    templated = ("args",)

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        assert isinstance(config, WasmTool)
        if ctx.wasm is None or not ctx.tenant:
            raise ToolError("unsupported", f"wasm tool {config.plugin!r}: this runner is not bound to a plug-in registry")
        return await ctx.wasm.run(config, ctx)


class CallbackKind(ToolKind):
    """``tool: callback``: the orchestrator waits for an external callback; no worker runs it."""

    name = "callback"
    config = CallbackTool
    on_worker = False

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        raise ToolError("unsupported", "a callback step waits for an external callback: it never runs on a data worker")


class PlaybookKind(ToolKind):
    """``tool: playbook``: the orchestrator starts a child execution and waits for it; no worker runs it."""

    name = "playbook"
    config = PlaybookTool
    templated = ("workload",)
    on_worker = False

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        assert isinstance(config, PlaybookTool)
        if at.step.timeout is not None:
            raise PlaybookError("a playbook step waits for its child to end: it takes no timeout "
                                "(cancel the parent to stop its children)", path=f"{at.step_path}.timeout")  # fmt: skip
        for field, value in (("project", config.project), ("affinity", config.affinity)):
            if value is None:
                continue
            if "{{" in value:
                at.template(value, field)
            elif value != "" or field == "project":
                _check_child_name(field, value, f"{at.path}.{field}")

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        raise ToolError("unsupported", "a playbook step starts a child execution from the orchestrator: it never runs "
                        "on a data worker")  # fmt: skip


class NatsKind(ToolKind):
    """``tool: nats``: publish ``data`` as JSON to ``subject`` (or a request: its reply is the result).

    The subject must match a pattern of ``NOETL_NATS_SUBJECTS`` and never the runtime's own subjects;
    checked at register time when it is literal, and always after rendering on the worker.
    """

    name = "nats"
    config = NatsTool
    templated = ("subject", "data")

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        assert isinstance(config, NatsTool)
        if "{{" not in config.subject:
            problem = subject_check(config.subject, at.policy.nats_subjects)
            if problem is not None:
                raise at.error(problem, "subject")

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        from worker.tools.nats_tool import run_nats

        assert isinstance(config, NatsTool)
        problem = subject_check(config.subject, ctx.policy.nats_subjects)
        if problem is not None:
            raise ToolError("denied", problem)
        return await run_nats(config, ctx)


def subject_check(subject: str, allowed: tuple[str, ...]) -> str | None:
    """Why a nats tool may not publish to ``subject`` under the ``allowed`` patterns, else None.

    >>> subject_check("wal.0.acme.web.1.step.exit", (">",))
    "subject 'wal.0.acme.web.1.step.exit' is the runtime's own (wal.>): a nats tool never publishes there"
    >>> subject_check("orders.new", ())
    "subject 'orders.new' is not allowed by the operator policy (NOETL_NATS_SUBJECTS: none)"
    """
    problem = subject_problem(subject)
    if problem is not None:
        return problem
    reserved = reserved_subject(subject)
    if reserved is not None:
        return f"subject {subject!r} is the runtime's own ({reserved}): a nats tool never publishes there"
    if not any(subject_matches(pattern, subject) for pattern in allowed):
        return (f"subject {subject!r} is not allowed by the operator policy "
                f"(NOETL_NATS_SUBJECTS: {', '.join(allowed) or 'none'})")  # fmt: skip
    return None


class DuckdbKind(ToolKind):
    """``tool: duckdb``: SQL over earlier steps' results, each a table named after its step; the result is Arrow.

    When the command is issued, ``tables`` (step names) becomes ``{name: {"result", "result_ref"}}`` from what
    templates see as ``steps.<name>``, so the worker reads a result stored by reference from the result store.
    """

    name = "duckdb"
    config = DuckdbTool

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        assert isinstance(config, DuckdbTool)
        if not isinstance(config.tables, tuple):
            raise at.error("tables lists the names of earlier steps (their results are filled in when the step "
                           "runs)", "tables")  # fmt: skip
        for j, name in enumerate(config.tables):
            if name not in at.steps:
                raise at.error(f"unknown step {name!r} (not a step of this playbook)", f"tables[{j}]")
            if name == at.step.name:
                raise at.error(f"step {name!r} cannot read its own result", f"tables[{j}]")
            if name in config.tables[:j]:
                raise at.error(f"step {name!r} is listed twice", f"tables[{j}]")

    def render(self, tool: dict[str, Any], render: Callable[[Any], Any], steps: Mapping[str, Any]) -> dict[str, Any]:
        tables: dict[str, Any] = {}
        for name in tool.get("tables") or []:
            run = steps.get(name) or {}
            tables[name] = {"status": run.get("status"), "result": run.get("result"), "result_ref": run.get("result_ref")}
        # Inline results ride in the command: refuse (the step fails, type template) what a command cannot carry.
        size = len(msgspec.json.encode(tables))
        if size > MAX_INLINE_TABLES:
            raise ExpressionError(f"tables: the inline results of {', '.join(tables)} are {size} bytes as JSON, more "
                                  f"than a command carries ({MAX_INLINE_TABLES})")  # fmt: skip
        tool["tables"] = tables
        return tool

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        from worker.tools.duckdb_tool import run_duckdb

        assert isinstance(config, DuckdbTool)
        return await run_duckdb(config, ctx)

