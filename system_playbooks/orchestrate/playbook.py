"""The playbook format: YAML validated into frozen msgspec Structs, with errors that name their path.

A playbook is a list of steps; the first is the start step. Each step runs a
``tool`` and then follows its ``next`` arcs whose ``when`` guard holds (several
arcs taken = parallel branches; a step with ``join`` waits for the named
steps). ``loop`` fans a step out over a list. The graph of ``next`` and
``on_error`` arcs must be acyclic (repetition is expressed with ``loop`` and
``retry``) and every step must be reachable from the start step.

Everything a tenant could use to reach beyond its sandbox is checked against
the operator's :class:`Policy` at load (register) time: a tool kind must be
allowed (``NOETL_TOOL_KINDS``, the built-in kinds by default), a ``python``
tool may only name a callable under an allowed module prefix, an ``http``
tool only an allowed host, a ``nats`` tool only an allowed subject. With the
default policy the last three are refused.

The tool kinds are a registry (:mod:`worker.tools.registry`):
a step's ``tool`` is validated as the config Struct of the kind it names, and
checked by that kind (:mod:`worker.tools.kinds` for the
built-in ones). The configs of the built-in kinds are defined here.

Problems are reported one at a time, the first in document order, as
:class:`PlaybookError` whose message starts with the path of the problem
(``steps[2].next[0].when: unexpected '(' at column 7``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union, cast
from urllib.parse import urlsplit

import msgspec
import yaml

from kernel.errors import ConfigError
from locator.command import DEFAULT_POOL, TIMER_POOL
from locator.names import NAME_PATTERN, STEP_PATTERN
from system_playbooks.orchestrate.errors import ExpressionError, PlaybookError
from system_playbooks.orchestrate.expressions import FUNCTIONS, LITERALS, ROOTS, Expression, compile_expression
from worker.tools.registry import BUILTIN_KINDS, ENTRY_POINT_GROUP, KindCheck, ToolConfig, registry
from system_playbooks.orchestrate.templates import compile_template

__all__ = [
    "MAX_PLAYBOOK_BYTES",
    "Arc",
    "RESERVED_SUBJECTS",
    "CallbackTool",
    "DuckdbTool",
    "HttpAuth",
    "HttpTool",
    "Loop",
    "NatsTool",
    "NoopTool",
    "Playbook",
    "PlaybookError",
    "PlaybookTool",
    "Policy",
    "PythonTool",
    "Retry",
    "Step",
    "Tool",
    "WasmTool",
    "credential_refs",
    "decode_playbook",
    "load_playbook",
    "parse_playbook",
    "reserved_subject",
    "subject_matches",
    "subject_problem",
    "tool_kind",
]

MAX_PLAYBOOK_BYTES: Final = 1024 * 1024
PATH_PATTERN: Final = r"^[a-z0-9_-]+(/[a-z0-9_-]+)*$"
CALL_RE: Final = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z][A-Za-z0-9_]*)$")
LOOP_VAR_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# What an expression may name outside a loop step's tool; there it may also name the loop's ``as`` and ``index``.
DATA_ROOTS: Final = frozenset({"workload", "steps"})
# A credential alias follows the name rule of tenants and projects; a python tool's name for it is an identifier.
ALIAS_RE: Final = re.compile(NAME_PATTERN)
CREDENTIAL_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
HEADER_NAME_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")

# The runtime's own subjects: a nats tool never publishes there, whatever NOETL_NATS_SUBJECTS allows
# (the WAL, commands, dead letters, the ingest subjects that map into the WAL, JetStream/KV/system APIs,
# replies to other clients' requests).
RESERVED_SUBJECTS: Final = ("wal.>", "cmd.>", "dlq.>", "in.>", "ina.>", "$JS.>", "$KV.>", "$O.>", "$SYS.>",
                            "_INBOX.>")  # fmt: skip
_SUBJECT_TOKEN_RE: Final = re.compile(r"^[^\s.*>]+$")

StepName = Annotated[str, msgspec.Meta(pattern=STEP_PATTERN)]
PlaybookPath = Annotated[str, msgspec.Meta(pattern=PATH_PATTERN, max_length=255)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the operator lets tenants' playbooks reach.

    ``python_allow`` holds module prefixes: ``"examples.tools."`` allows
    ``examples.tools.math:add``; a prefix without a trailing dot allows that
    module and its submodules. ``http_hosts`` holds hosts: ``"api.example.com"``
    exactly, or ``"*.example.com"`` for any subdomain (not the apex itself).
    ``tool_kinds`` holds the tool kinds playbooks may use (the built-in ones by
    default); ``nats_subjects`` the NATS subject patterns (``*`` one token,
    ``>`` the rest) ``nats`` tools may publish to, never one of
    :data:`RESERVED_SUBJECTS`.

    >>> Policy(python_allow=("examples.tools.",)).allows_call("examples.tools.math:add")
    True
    >>> Policy().allows_host("example.com")
    False
    >>> Policy(nats_subjects=("orders.>",)).allows_subject("orders.eu.new")
    True
    """

    python_allow: tuple[str, ...] = ()
    http_hosts: tuple[str, ...] = ()
    tool_kinds: tuple[str, ...] = BUILTIN_KINDS
    nats_subjects: tuple[str, ...] = ()

    def allows_kind(self, kind: str) -> bool:
        return kind in self.tool_kinds

    def allows_subject(self, subject: str) -> bool:
        """Does a pattern of ``nats_subjects`` match the literal ``subject`` (reserved ones aside)?"""
        return reserved_subject(subject) is None and any(subject_matches(p, subject) for p in self.nats_subjects)

    def allows_call(self, call: str) -> bool:
        module = call.partition(":")[0]
        for prefix in self.python_allow:
            if prefix.endswith(".") and module.startswith(prefix):
                return True
            if not prefix.endswith(".") and (module == prefix or module.startswith(prefix + ".")):
                return True
        return False

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for allowed in self.http_hosts:
            allowed = allowed.lower().rstrip(".")
            if allowed.startswith("*.") and host.endswith(allowed[1:]) and len(host) > len(allowed) - 1:
                return True
            if host == allowed:
                return True
        return False


def subject_matches(pattern: str, subject: str) -> bool:
    """Does the NATS subject ``pattern`` (``*`` one token, ``>`` one or more at the end) match ``subject``?

    >>> subject_matches("orders.*.new", "orders.eu.new"), subject_matches("orders.>", "orders")
    (True, False)
    """
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


def reserved_subject(subject: str) -> str | None:
    """The reserved pattern ``subject`` falls under (or the ``$`` it starts with), else None.

    >>> reserved_subject("wal.0.acme.web.1.step.exit"), reserved_subject("orders.new")
    ('wal.>', None)
    """
    if subject.startswith("$"):
        return "$..."
    return next((p for p in RESERVED_SUBJECTS if subject_matches(p, subject)), None)


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot be published to (not a literal NATS subject), else None."""
    if not subject or len(subject) > 255 or not all(_SUBJECT_TOKEN_RE.match(t) for t in subject.split(".")):
        return f"invalid subject {subject!r}: dot-separated tokens without spaces or wildcards, at most 255 characters"
    return None


class _Struct(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Playbooks are written by hand: an unknown field is a typo (``retyr:``), never silently ignored."""


class PythonTool(ToolConfig, frozen=True, tag="python"):
    """Call ``package.module:function`` with the rendered ``args`` as keyword arguments.

    ``credentials`` maps a name to a keychain alias of the project: the worker resolves each
    right before the call and passes the value (text) as ``noetl["credentials"][name]``.
    """

    call: str
    args: dict[str, Any] = {}
    credentials: dict[str, str] = {}


class HttpAuth(_Struct, frozen=True):
    """Authenticate an ``http`` request with the keychain credential ``credential`` of the project.

    ``bearer`` sends ``Authorization: Bearer <value>``; ``basic`` sends the value
    (``user:password``) as ``Authorization: Basic <base64>``; ``header`` sends the
    value in the header named ``header``. The value is resolved on the worker only.
    """

    type: Literal["bearer", "basic", "header"]
    credential: str
    header: str | None = None

    @property
    def header_name(self) -> str:
        """The header the credential goes in."""
        return self.header if self.type == "header" and self.header else "Authorization"


class HttpTool(ToolConfig, frozen=True, tag="http"):
    """One HTTP request to a host the policy allows; ``url``, ``headers`` and ``body`` are templates."""

    url: str
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: dict[str, str] = {}
    body: Any = None
    timeout: Seconds = 30.0
    auth: HttpAuth | None = None


class WasmTool(ToolConfig, frozen=True, tag="wasm"):
    """Run the project's WASM plug-in ``plugin`` (its active version, or ``version``) with the rendered ``args``."""

    plugin: PlaybookPath
    args: dict[str, Any] = {}
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None


class NoopTool(ToolConfig, frozen=True, tag="noop"):
    """Do nothing; the step's result is the rendered ``result`` (None by default)."""

    result: Any = None


class CallbackTool(ToolConfig, frozen=True, tag="callback"):
    """Wait for an external callback, at most ``timeout`` seconds."""

    timeout: Seconds = 300.0


class PlaybookTool(ToolConfig, frozen=True, tag="playbook"):
    """Start the playbook ``path`` (its latest version, or ``version``) as a child execution and wait for it.

    The child runs in the same tenant, in ``project`` and ``affinity`` (the parent's by default; either
    may be a template, checked when rendered), with the rendered ``workload``. The step ends with the
    child's status and result, like a callback, without holding a worker meanwhile.
    """

    path: PlaybookPath
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    workload: dict[str, Any] = {}
    project: str | None = None
    affinity: str | None = None


class NatsTool(ToolConfig, frozen=True, tag="nats"):
    """Publish the rendered ``data`` as JSON to ``subject``; with ``request``, send a request and wait ``timeout``
    seconds for the reply (the step's result: decoded JSON, else text). ``subject`` may be a template; it must
    match a pattern of the operator's ``NOETL_NATS_SUBJECTS`` and never a reserved subject."""

    subject: str
    data: Any = None
    request: bool = False
    timeout: Seconds = 10.0


class DuckdbTool(ToolConfig, frozen=True, tag="duckdb"):
    """Run the SQL query ``sql`` over the results of earlier steps, each the table named after its step.

    ``tables`` names those steps; when the command is issued each name becomes that step's result
    (inline, or its ``result_ref``), which the worker reads into the table (see docs/orchestrate.md).
    """

    sql: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    tables: tuple[StepName, ...] | dict[str, Any] = ()
    max_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 1_000_000


# The built-in kinds' configs; a playbook checked through the registry may hold any installed kind's ToolConfig.
Tool = PythonTool | HttpTool | WasmTool | NoopTool | CallbackTool | PlaybookTool | NatsTool | DuckdbTool
TOOL_KINDS: Final = BUILTIN_KINDS


class Arc(_Struct, frozen=True):
    """An arc to ``step``, taken when the ``when`` expression is truthy (always, without one)."""

    step: StepName
    when: str | None = None


class Loop(_Struct, frozen=True):
    """Fan the step out over the list ``over`` evaluates to; each iteration sees it as ``as`` and ``index``."""

    over: str
    as_: str = msgspec.field(default="item", name="as")


class Retry(_Struct, frozen=True):
    """Run the step at most ``max_attempts`` times, waiting ``backoff`` seconds before each retry."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class Step(_Struct, frozen=True):
    """One step of a playbook."""

    name: StepName
    tool: Tool
    next: tuple[Arc, ...] = ()
    loop: Loop | None = None
    join: tuple[StepName, ...] = ()
    retry: Retry | None = None
    timeout: Seconds | None = None
    on_error: StepName | None = None
    # The worker pool its commands go to (cmd.<shard>.<pool>); unset: the default pool, shared.
    pool: str | None = None

    @property
    def worker_pool(self) -> str:
        """The pool whose workers run this step's commands."""
        return self.pool or DEFAULT_POOL


class Playbook(_Struct, frozen=True):
    """A validated playbook; build it with :func:`load_playbook` (or :func:`parse_playbook`).

    >>> pb = load_playbook('''
    ... path: demo/hello
    ... version: 1
    ... steps:
    ...   - {name: a, tool: {kind: noop}, next: [{step: b}]}
    ...   - {name: b, tool: {kind: noop}}
    ... ''', policy=Policy())
    >>> pb.start, [s.name for s in pb.steps]
    ('a', ['a', 'b'])
    >>> load_playbook("path: demo/x\\nversion: 1\\nsteps: [{name: a, tool: {kind: shell}}]", policy=Policy())
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    system_playbooks.orchestrate.errors.PlaybookError: steps[0].tool.kind: unknown tool kind 'shell' (...)
    """

    path: PlaybookPath
    version: Annotated[int, msgspec.Meta(ge=1)]
    steps: Annotated[tuple[Step, ...], msgspec.Meta(min_length=1)]
    workload: dict[str, Any] = {}
    # A template evaluated when the execution completes (workload, steps); unset: the result of the
    # step that completed last (see system_playbooks.orchestrate.planner.execution_result).
    result: Any | msgspec.UnsetType = msgspec.UNSET

    @property
    def start(self) -> str:
        """The name of the start step (the first in the list)."""
        return self.steps[0].name

    def step(self, name: str) -> Step:
        """The step called ``name``; ``KeyError`` if there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def credential_refs(playbook: Playbook) -> list[tuple[str, str]]:
    """(path, alias) of every keychain alias the playbook references, in document order.

    >>> pb = parse_playbook({"path": "demo/c", "version": 1, "steps": [{"name": "a", "tool": {
    ...     "kind": "http", "url": "https://api.example.com/", "auth": {"type": "bearer", "credential": "api"}}}]},
    ...     policy=Policy(http_hosts=("api.example.com",)))
    >>> credential_refs(pb)
    [('steps[0].tool.auth.credential', 'api')]
    """
    refs: list[tuple[str, str]] = []
    kinds = registry()
    for i, step in enumerate(playbook.steps):
        tool: ToolConfig = step.tool
        kind = kinds.kind(tool_kind(tool))
        refs.extend((f"steps[{i}].tool.{field}", alias) for field, alias in kind.credentials(tool))
    return refs


# --- loading --------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML without timestamps: ``2026-01-01`` in a workload stays the string it looks like."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _read_yaml(text: str) -> Any:
    try:
        # Aliases would let a small document expand into a huge one in every walk that follows.
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
                raise PlaybookError(f"YAML aliases are not supported ({where})")
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PlaybookError(f"invalid YAML: {where}{problem}") from None


def load_playbook(source: str | bytes | Path, *, policy: Policy) -> Playbook:
    """Load and validate a playbook from YAML text (``str``/``bytes``) or a file (``Path``).

    Raises :class:`PlaybookError` naming the path of the first problem.
    """
    if isinstance(source, Path):
        try:
            raw = source.read_bytes()
        except OSError as e:
            raise PlaybookError(f"cannot read playbook {source}: {e}") from e
    else:
        raw = source.encode("utf-8") if isinstance(source, str) else source
    if len(raw) > MAX_PLAYBOOK_BYTES:
        raise PlaybookError(f"playbook is {len(raw)} bytes, more than {MAX_PLAYBOOK_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlaybookError(f"playbook is not UTF-8: {e}") from None
    return parse_playbook(_read_yaml(text), policy=policy)


def _msgspec_error(e: msgspec.ValidationError) -> PlaybookError:
    # msgspec says "Expected `int` >= 1 - at `$.steps[0].retry.max_attempts`"; lead with the path instead.
    message = str(e)
    match = re.fullmatch(r"(.*) - at `\$(.*)`", message, re.DOTALL)
    reason, path = match.groups() if match is not None else (message, "")
    return PlaybookError(reason[:1].lower() + reason[1:], path=path.lstrip("."))


def _check_tool_kinds(data: object, policy: Policy) -> None:
    # The tagged union would say "Invalid value 'shell'"; name the tool kinds the operator allows instead.
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list):
        return
    kinds = registry()
    allowed = ", ".join(policy.tool_kinds) or "none"
    for i, step in enumerate(steps):
        tool = step.get("tool") if isinstance(step, dict) else None
        if not isinstance(tool, dict):
            continue
        path = f"steps[{i}].tool.kind"
        if "kind" not in tool:
            raise PlaybookError(f"missing tool kind (one of {allowed})", path=path)
        kind = tool["kind"]
        installed = isinstance(kind, str) and (kind in kinds.kinds or kind in kinds.broken)
        if not isinstance(kind, str) or not policy.allows_kind(kind):
            if installed:
                raise PlaybookError(f"tool kind {kind!r} is not allowed by the operator (NOETL_TOOL_KINDS "
                                    f"allows: {allowed})", path=path)  # fmt: skip
            raise PlaybookError(f"unknown tool kind {kind!r} (one of {allowed})", path=path)
        try:
            kinds.kind(kind)
        except ConfigError as e:
            raise PlaybookError(f"{e} (NOETL_TOOL_KINDS allows it)", path=path) from None


def tool_kind(tool: ToolConfig) -> str:
    """The kind name of a tool config (its tag)."""
    return str(tool.__struct_config__.tag)


@functools.cache
def _validating(kinds: frozenset[str]) -> type[Playbook]:
    """A Playbook subclass whose steps' ``tool`` is the tagged union of the configs of ``kinds``, to validate with."""
    configs = tuple(registry().kinds[name].config for name in sorted(kinds))
    union: Any = Union[configs] if configs else ToolConfig  # noqa: UP007 - built at run time
    options: dict[str, Any] = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}
    step = msgspec.defstruct("Step", [("tool", union)], bases=(Step,), **options)
    steps = Annotated[tuple[step, ...], msgspec.Meta(min_length=1)]  # type: ignore[valid-type]
    return cast(type[Playbook], msgspec.defstruct("Playbook", [("steps", steps)], bases=(Playbook,), **options))


def _plain(playbook: Playbook) -> Playbook:
    """The same playbook as a :class:`Playbook` of :class:`Step` (not of the validating subclasses)."""
    fields = {name: getattr(playbook, name) for name in playbook.__struct_fields__}
    fields["steps"] = tuple(Step(**{name: getattr(s, name) for name in s.__struct_fields__}) for s in playbook.steps)
    return Playbook(**fields)


def decode_playbook(data: bytes) -> Playbook:
    """A playbook the catalog stored as JSON (validated when registered), of any installed tool kind.

    Raises ``msgspec.ValidationError`` / ``msgspec.DecodeError``; a kind no longer installed is an
    invalid ``kind`` at its path.
    """
    return _plain(msgspec.json.decode(data, type=_validating(frozenset(registry().kinds))))


def parse_playbook(data: object, *, policy: Policy) -> Playbook:
    """Validate an already-decoded playbook document (a dict, as from YAML or JSON)."""
    _check_tool_kinds(data, policy)
    kinds = frozenset(policy.tool_kinds) & frozenset(registry().kinds)
    try:
        playbook = _plain(msgspec.convert(data, _validating(kinds)))
    except msgspec.ValidationError as e:
        raise _msgspec_error(e) from None
    _check_graph(playbook)
    steps = frozenset(step.name for step in playbook.steps)
    loops = _loops(playbook)
    for i, step in enumerate(playbook.steps):
        _check_step(step, f"steps[{i}]", policy, steps=steps, loops=loops)
    if playbook.result is not msgspec.UNSET:
        _template(playbook.result, "result", _Scope(playbook.steps[0], False, DATA_ROOTS, steps, loops))
    return playbook


# --- graph ----------------------------------------------------------------


def _edges(step: Step, where: str) -> Iterator[tuple[str, str]]:
    """(target, path of the arc) for every arc out of ``step``: its ``next`` arcs, then ``on_error``."""
    for j, arc in enumerate(step.next):
        yield arc.step, f"{where}.next[{j}].step"
    if step.on_error is not None:
        yield step.on_error, f"{where}.on_error"


def _check_graph(playbook: Playbook) -> None:
    index: dict[str, int] = {}
    for i, step in enumerate(playbook.steps):
        if step.name in index:
            raise PlaybookError(
                f"duplicate step name {step.name!r} (first at steps[{index[step.name]}])", path=f"steps[{i}].name"
            )
        index[step.name] = i
    for i, step in enumerate(playbook.steps):
        for target, where in _edges(step, f"steps[{i}]"):
            if target not in index:
                raise PlaybookError(f"unknown step {target!r}", path=where)
        for j, name in enumerate(step.join):
            if name not in index:
                raise PlaybookError(f"unknown step {name!r}", path=f"steps[{i}].join[{j}]")
            if all(arc.step != step.name for arc in playbook.steps[index[name]].next):
                raise PlaybookError(
                    f"step {name!r} has no arc to {step.name!r}, so {step.name!r} would wait for it forever",
                    path=f"steps[{i}].join[{j}]",
                )
    _check_acyclic(playbook, index)
    reached = {playbook.start}
    frontier = [playbook.start]
    while frontier:
        step = playbook.steps[index[frontier.pop()]]
        for target, _ in _edges(step, ""):
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    for i, step in enumerate(playbook.steps):
        if step.name not in reached:
            raise PlaybookError(
                f"step {step.name!r} is unreachable from the start step {playbook.start!r}", path=f"steps[{i}].name"
            )


def _check_acyclic(playbook: Playbook, index: Mapping[str, int]) -> None:
    # Iterative DFS in document order, so the reported cycle is deterministic and deep graphs cannot overflow.
    done: set[str] = set()
    for root in playbook.steps:
        if root.name in done:
            continue
        trail: list[str] = [root.name]
        on_trail = {root.name}
        pending = [iter(list(_edges(root, f"steps[{index[root.name]}]")))]
        while pending:
            advanced = False
            for target, where in pending[-1]:
                if target in on_trail:
                    cycle = " -> ".join([*trail[trail.index(target) :], target])
                    raise PlaybookError(f"cycle {cycle} (repeat work with loop or retry instead)", path=where)
                if target not in done:
                    trail.append(target)
                    on_trail.add(target)
                    step = playbook.steps[index[target]]
                    pending.append(iter(list(_edges(step, f"steps[{index[target]}]"))))
                    advanced = True
                    break
            if not advanced:
                pending.pop()
                finished = trail.pop()
                on_trail.discard(finished)
                done.add(finished)


# --- steps ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Scope:
    """What the expressions of one place in a step may name: roots (``names``), and the steps of the playbook."""

    step: Step
    in_tool: bool
    names: frozenset[str]
    steps: frozenset[str]
    loops: Mapping[str, str]  # loop variable -> the first step that declares it


def _loops(playbook: Playbook) -> dict[str, str]:
    loops: dict[str, str] = {}
    for step in playbook.steps:
        if step.loop is not None:
            loops.setdefault(step.loop.as_, step.name)
    return loops


def _broad(scope: _Scope) -> frozenset[str]:
    """Every name an expression of the playbook may use somewhere: compiling with these finds the other errors."""
    return ROOTS | frozenset(scope.loops)


def _out_of_scope(name: str, scope: _Scope) -> str:
    step = scope.step
    if step.loop is not None and name in (step.loop.as_, "index"):
        why = f"step {step.name!r} defines it for its tool only, not for its loop.over or next"
    elif step.loop is not None and scope.in_tool:
        why = f"the loop variable of step {step.name!r} is {step.loop.as_!r}"
    elif name in scope.loops and name not in ("item", "index"):
        why = f"the loop variable of step {scope.loops[name]!r}, defined only in that step's tool"
    else:
        why = "a loop variable, defined only in the tool of a step with a loop"
    return f"unknown name {name!r} ({why})"


def _unknown_step(key: str | int, steps: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, steps, n=1) if isinstance(key, str) else []
    hint = f"did you mean {close[0]!r}?" if close else "not a step of this playbook"
    return f"unknown step {key!r} ({hint})"


def _check_names(expression: Expression, scope: _Scope, offset: int = 0) -> None:
    """Every root is in scope and every ``steps.<name>`` (or ``steps['name']``) names a step of the playbook."""
    for reference in expression.references():
        column = reference.column + offset
        if reference.root not in scope.names:
            raise ExpressionError(_out_of_scope(reference.root, scope), column=column)
        if reference.root == "steps" and reference.key is not None and reference.key not in scope.steps:
            raise ExpressionError(_unknown_step(reference.key, scope.steps), column=column)


def _compile(text: str, scope: _Scope) -> Expression:
    try:
        return compile_expression(text, names=scope.names)
    except ExpressionError as e:
        try:  # the only problem may be a loop variable out of its scope: say so
            broad = compile_expression(text, names=_broad(scope))
        except ExpressionError:
            raise e from None
        _check_names(broad, scope)
        raise


def _expression(text: str, path: str, scope: _Scope) -> None:
    try:
        _check_names(_compile(text, scope), scope)
    except ExpressionError as e:
        raise PlaybookError(str(e), path=path) from None


def _template(value: Any, path: str, scope: _Scope) -> None:
    try:
        failure: ExpressionError | None = None
        try:
            template = compile_template(value, names=scope.names)
        except ExpressionError as e:
            failure = e
            try:  # the only problem may be a loop variable out of its scope: say so
                template = compile_template(value, names=_broad(scope))
            except ExpressionError:
                raise e from None
        for sub, offset, expression in template.expressions():
            try:
                _check_names(expression, scope, offset)
            except ExpressionError as e:
                raise ExpressionError(e.reason, column=e.column, path=sub) from None
        if failure is not None:
            raise failure
    except ExpressionError as e:
        raise PlaybookError(str(e), path=path + e.path) from None


def _check_step(step: Step, where: str, policy: Policy, *, steps: frozenset[str], loops: Mapping[str, str]) -> None:
    if step.pool is not None:
        _check_pool(step, f"{where}.pool")
    around = _Scope(step, False, DATA_ROOTS, steps, loops)
    if step.loop is not None:
        var = step.loop.as_
        if LOOP_VAR_RE.fullmatch(var) is None or var in ROOTS - {"item"} or var in LITERALS or var in FUNCTIONS:
            raise PlaybookError(
                f"invalid loop variable {var!r}: a lowercase identifier other than "
                "workload, steps, index, true, false, null and the function names",
                path=f"{where}.loop.as",
            )
        _expression(step.loop.over, f"{where}.loop.over", around)
    for j, arc in enumerate(step.next):
        if arc.when is not None:
            _expression(arc.when, f"{where}.next[{j}].when", around)
    inside = around if step.loop is None else _Scope(step, True, DATA_ROOTS | {step.loop.as_, "index"}, steps, loops)
    # The kind's own checks (policy, names), then its templated fields, in the order it lists them.
    config: ToolConfig = step.tool
    kind = registry().kind(tool_kind(config))
    at = KindCheck(path=f"{where}.tool", step=step, policy=policy, steps=steps,
                   check_template=lambda value, path: _template(value, path, inside))  # fmt: skip
    kind.check(config, at)
    for field in kind.templated:
        at.template(getattr(config, field), field)

def _check_pool(step: Step, path: str) -> None:
    pool = step.pool
    if ALIAS_RE.fullmatch(pool or "") is None:
        raise PlaybookError(f"invalid pool {pool!r}: must match {NAME_PATTERN} (it names the subject cmd.<shard>.<pool>)",
                            path=path)  # fmt: skip
    if pool == TIMER_POOL:
        raise PlaybookError(f"pool {TIMER_POOL!r} is reserved for the kernel's scheduler", path=path)
    if isinstance(step.tool, (CallbackTool, PlaybookTool)):
        raise PlaybookError(f"a {step.tool.__struct_config__.tag} step runs on no worker: it takes no pool", path=path)


def _check_child_name(field: str, value: str, path: str) -> None:
    if ALIAS_RE.fullmatch(value) is None:
        raise PlaybookError(f"invalid {field} {value!r}: must match {NAME_PATTERN}", path=path)


def _check_alias(alias: str, path: str) -> None:
    if ALIAS_RE.fullmatch(alias) is None:
        raise PlaybookError(f"invalid credential alias {alias!r}: must match {NAME_PATTERN}", path=path)


def _check_auth(auth: HttpAuth, headers: Mapping[str, str], path: str) -> None:
    _check_alias(auth.credential, f"{path}.credential")
    if auth.type == "header":
        if auth.header is None:
            raise PlaybookError("type 'header' needs the name of the header the credential goes in", path=f"{path}.header")
        if HEADER_NAME_RE.fullmatch(auth.header) is None:
            raise PlaybookError(f"invalid header name {auth.header!r}", path=f"{path}.header")
    elif auth.header is not None:
        raise PlaybookError(f"only type 'header' takes a header name (type {auth.type!r} uses Authorization)",
                            path=f"{path}.header")  # fmt: skip
    wanted = auth.header_name.lower()
    for name in headers:
        if name.lower() == wanted:
            raise PlaybookError(f"header {name!r} is set by auth from the keychain: remove it from headers",
                                path=f"{path[: -len('.auth')]}.headers.{name}")  # fmt: skip


def _check_url(url: str, path: str, policy: Policy) -> None:
    # Only the part before the first template can be checked, so it must hold the whole scheme://host/.
    static = url.partition("{{")[0]
    try:
        parts = urlsplit(static)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        raise PlaybookError(f"invalid url {url!r}: {e}", path=path) from None
    if "{{" in url and len(static) <= len(f"{parts.scheme}://{parts.netloc}"):
        raise PlaybookError(f"the host of {url!r} must not be templated", path=path)
    if parts.scheme not in ("http", "https") or not host:
        raise PlaybookError(f"invalid url {url!r}: expected http(s)://host/...", path=path)
    if not policy.allows_host(host):
        allowed = ", ".join(policy.http_hosts) or "none"
        raise PlaybookError(
            f"host {host!r} is not allowed by the operator policy (allowed hosts: {allowed})", path=path
        )
