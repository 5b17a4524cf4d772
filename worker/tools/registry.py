"""Tool kinds as a registry: each ``tool: {kind}`` of a playbook is a class found under an entry point.

A tool kind is a :class:`ToolKind` subclass that a Python package declares
under the entry-point group ``noetl_edge.tools`` (the entry point's name is
the kind's name)::

    [project.entry-points."noetl_edge.tools"]
    echo = "noetl_tool_echo:EchoKind"

It names its config, a :class:`ToolConfig` Struct tagged with the kind's name
(validated when a playbook is registered, errors naming their path such as
``steps[2].tool.url``), which of its fields are templates, and an async
:meth:`ToolKind.run`. The built-in kinds are declared the same way, in this
project's ``pyproject.toml``. Which installed kinds tenants may use is the
operator's choice (``NOETL_TOOL_KINDS``, see
:func:`system_playbooks.orchestrate.catalog.policy_from_env`).

Entry points are read once per process (:func:`registry`); a kind that cannot
be loaded (an import error, a wrong class) is kept as *broken*, with the
reason, so that only a playbook or an allow-list naming it fails, with that
reason. See docs/tools.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Final

import msgspec

from kernel.errors import ConfigError
from system_playbooks.orchestrate.errors import PlaybookError

if TYPE_CHECKING:
    from system_playbooks.orchestrate.playbook import Policy, Step
    from worker.tools.runner import ToolContext

__all__ = [
    "BUILTIN_KINDS",
    "ENTRY_POINT_GROUP",
    "KindCheck",
    "Registry",
    "ToolConfig",
    "ToolKind",
    "load_registry",
    "registry",
]

ENTRY_POINT_GROUP: Final = "noetl_edge.tools"
# The kinds this project declares (pyproject.toml) and the default of NOETL_TOOL_KINDS.
BUILTIN_KINDS: Final = ("callback", "duckdb", "http", "nats", "noop", "playbook", "python", "wasm")


class ToolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    """The base of every tool kind's config: subclass it with ``tag="<kind name>"``.

    Playbooks are written by hand, so an unknown field is an error (a typo), never ignored.

    >>> class Echo(ToolConfig, frozen=True, tag="echo"):
    ...     text: str
    >>> msgspec.convert({"kind": "echo", "text": "hi"}, Echo)
    Echo(text='hi')
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class KindCheck:
    """Where a tool config is being checked at register time, for :meth:`ToolKind.check`.

    ``path`` is the tool's path in the playbook (``steps[2].tool``); :meth:`error` builds a
    :class:`PlaybookError` under it; :meth:`template` checks a template as the playbook's
    own templated fields are checked (names in scope, steps that exist).
    """

    path: str
    step: Step
    policy: Policy
    steps: frozenset[str]
    check_template: Callable[[Any, str], None]

    @property
    def step_path(self) -> str:
        """The step's path (``steps[2]``), for a problem with the step around the tool."""
        return self.path.removesuffix(".tool")

    def error(self, message: str, field: str = "") -> PlaybookError:
        """A :class:`PlaybookError` at ``<path>.<field>`` (or the tool's path without ``field``)."""
        return PlaybookError(message, path=f"{self.path}.{field}" if field else self.path)

    def template(self, value: Any, field: str) -> None:
        """Check ``value`` as a template at ``<path>.<field>``; raises :class:`PlaybookError`."""
        self.check_template(value, f"{self.path}.{field}")


class ToolKind:
    """A tool kind: subclass it, set the class attributes, implement :meth:`run`, declare it as an entry point.

    * ``name``: the kind (``tool: {kind: <name>}``); it must equal the entry point's name and the config's tag.
    * ``config``: a :class:`ToolConfig` subclass, tagged ``name``.
    * ``templated``: the config fields rendered as templates when the step's command is issued
      (``{{ workload.x }}``, ``{{ steps.a.result }}``…), checked at register time.
    * ``on_worker``: False for a kind the orchestrator carries out itself (``callback``, ``playbook``).

    >>> class Echo(ToolConfig, frozen=True, tag="echo"):
    ...     text: str
    >>> class EchoKind(ToolKind):
    ...     name = "echo"
    ...     config = Echo
    ...     templated = ("text",)
    ...     async def run(self, config: ToolConfig, ctx: Any) -> Any:
    ...         assert isinstance(config, Echo)
    ...         return {"echo": config.text, "step": ctx.step}
    >>> load_registry([]).adopt("echo", EchoKind).name
    'echo'
    """

    name: ClassVar[str]
    config: ClassVar[type[ToolConfig]]
    templated: ClassVar[tuple[str, ...]] = ()
    on_worker: ClassVar[bool] = True

    def check(self, config: ToolConfig, at: KindCheck) -> None:
        """Register-time checks beyond the Struct's types (the operator policy, names…); raise ``at.error(...)``.

        The ``templated`` fields are checked as templates after this, by the playbook loader.
        """

    def credentials(self, config: ToolConfig) -> list[tuple[str, str]]:
        """(field path under the tool, keychain alias) of each credential the config references.

        The catalog refuses a playbook whose alias is not set in its project; the worker resolves
        each right before :meth:`run` into ``ctx.secrets`` and masks the values in what the step reports.
        """
        return []

    def render(self, tool: dict[str, Any], render: Callable[[Any], Any], steps: Mapping[str, Any]) -> dict[str, Any]:
        """The command's tool: the config as JSON (``tool``) with its ``templated`` fields rendered.

        ``steps`` is what templates see as ``steps`` (``{name: {status, result, result_ref, error}}``), for a
        kind that hands earlier steps' results to its worker otherwise than through a template.
        Raises :class:`~system_playbooks.orchestrate.errors.ExpressionError` when a template fails.
        """
        for name in self.templated:
            if name in tool:
                tool[name] = render(tool[name])
        return tool

    async def run(self, config: ToolConfig, ctx: ToolContext) -> Any:
        """Run the rendered config; return a JSON value or a ``pyarrow.Table`` (stored by reference).

        Raise :class:`~worker.tools.runner.ToolError` (``type``, ``message``) on failure.
        """
        from worker.tools.runner import ToolError

        raise ToolError("unsupported", f"a {self.name} step never runs on a data worker")


@dataclasses.dataclass(frozen=True)
class Registry:
    """The installed tool kinds (``kinds``) and the entry points that could not be loaded (``broken``: the reason).

    >>> reg = registry()
    >>> reg.kind("noop").templated
    ('result',)
    >>> reg.kind("shell")
    Traceback (most recent call last):
    ...
    kernel.errors.ConfigError: no tool kind 'shell' is installed (no entry point 'shell' in group noetl_edge.tools)
    """

    kinds: Mapping[str, ToolKind]
    broken: Mapping[str, str]

    def kind(self, name: str) -> ToolKind:
        """The kind called ``name``; :class:`ConfigError` naming the entry point when it is missing or broken."""
        found = self.kinds.get(name)
        if found is not None:
            return found
        if name in self.broken:
            raise ConfigError(f"tool kind {name!r} cannot be loaded: {self.broken[name]}")
        raise ConfigError(f"no tool kind {name!r} is installed (no entry point {name!r} in group {ENTRY_POINT_GROUP})")

    def check_allowed(self, allowed: Iterable[str], *, setting: str = "NOETL_TOOL_KINDS") -> None:
        """Every allowed kind is installed and loads; else a :class:`ConfigError` naming the setting and the kind."""
        for name in allowed:
            try:
                self.kind(name)
            except ConfigError as e:
                raise ConfigError(f"{setting}: {e}") from None

    def adopt(self, name: str, cls: Any) -> ToolKind:
        """An instance of the class ``cls`` found under the entry point ``name``; :class:`ConfigError` saying what
        is wrong with it (not a ToolKind, a name, config or ``templated`` field that does not match)."""
        if not isinstance(cls, type) or not issubclass(cls, ToolKind):
            raise ConfigError(f"{cls!r} is not a ToolKind subclass")
        if getattr(cls, "name", None) != name:
            raise ConfigError(f"{cls.__qualname__}.name is {getattr(cls, 'name', None)!r}, not the entry point's {name!r}")
        config = getattr(cls, "config", None)
        if not isinstance(config, type) or not issubclass(config, ToolConfig):
            raise ConfigError(f"{cls.__qualname__}.config must be a ToolConfig subclass, got {config!r}")
        tag = config.__struct_config__.tag
        if tag != name:
            raise ConfigError(f"{config.__qualname__} must be declared with tag={name!r} (it has tag={tag!r})")
        unknown = [field for field in cls.templated if field not in config.__struct_fields__]
        if unknown:
            raise ConfigError(f"{cls.__qualname__}.templated names {unknown[0]!r}, not a field of {config.__qualname__}")
        return cls()


def load_registry(points: Iterable[EntryPoint]) -> Registry:
    """Load ``points`` (entry points of the group); one that fails is recorded in ``broken``, not raised."""
    kinds: dict[str, ToolKind] = {}
    broken: dict[str, str] = {}
    seen: dict[str, str] = {}
    shell = Registry(kinds, broken)
    for point in points:
        where = f"entry point {point.name} = {point.value}"
        if point.name in seen:
            if seen[point.name] != point.value:  # the same package found twice on the path is not a conflict
                kinds.pop(point.name, None)
                broken[point.name] = f"declared twice ({seen[point.name]} and {point.value})"
            continue
        seen[point.name] = point.value
        try:
            kinds[point.name] = shell.adopt(point.name, point.load())
        except Exception as e:  # noqa: BLE001 - an import runs arbitrary package code: any failure is the kind's
            broken[point.name] = f"{where}: {type(e).__name__}: {e}"
    return Registry(kinds, broken)


@functools.cache
def registry() -> Registry:
    """The tool kinds installed in this process's environment (entry points read once)."""
    return load_registry(entry_points(group=ENTRY_POINT_GROUP))
