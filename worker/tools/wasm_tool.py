"""``tool: wasm`` steps: a tenant's module from the plug-in registry, run under the user capability ring.

The step's rendered ``args`` become the module's input, a one-row Arrow table
(one column per argument, in name order: bool, int64, float64 and utf8 as they
are, null as a null utf8, lists and objects as their JSON text), with the step
attempt in the schema metadata (``noetl.execution_id``, ``noetl.step``,
``noetl.attempt``, ``noetl.iteration``). The module's output, an Arrow IPC
stream, is the step's result: its rows as JSON objects when the table is
small, else the table itself (stored by reference); a ``result_put`` replaces
it. The user ring grants ``event_publish`` (``user.*`` events of the step's own
execution, published after the call succeeded), ``result_put`` and ``log``.

The version that ran is recorded in the ``step.exit`` payload as
``plugin: {"path", "version", "digest"}``.

Every call runs under the operator's :class:`WasmLimits` (``NOETL_WASM_FUEL``,
``NOETL_WASM_MEMORY``, ``NOETL_WASM_TIMEOUT``), read by ``noetl-edge worker``
and ``up`` when they start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
import pyarrow as pa
import structlog
from nats.js import JetStreamContext

from kernel.errors import ConfigError
from worker.plugins import PluginRecord, PluginRegistry, PluginRegistryError
from kernel.producer import Producer
from worker.wasm import Grants, Invocation, WasmError, WasmHost
from worker.wasm_intents import EventIntent, LogIntent, ResultIntent
from worker.worker import Reported
from locator.envelope import DEFAULT_PAYLOAD_CAP, new_event
from locator.topology import Topology
from system_playbooks.orchestrate.playbook import WasmTool
from system_playbooks.wasm_sdk.framing import from_stream, to_stream

if TYPE_CHECKING:
    from worker.tools.runner import ToolContext

__all__ = ["USER_FUNCTIONS", "WasmLimits", "WasmTools", "args_table"]

USER_FUNCTIONS: Final = frozenset({"event_publish", "result_put", "log"})
log = structlog.get_logger("noetl.wasm")
_json: Final = msgspec.json.Encoder(order="sorted")


class WasmLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits of every user-tool call: fuel, linear memory (bytes) and wall-clock time (seconds).

    From ``NOETL_WASM_FUEL``, ``NOETL_WASM_MEMORY`` and ``NOETL_WASM_TIMEOUT``
    (unset or empty: the default); a bad value is a :class:`ConfigError` that
    names the variable.

    >>> WasmLimits.from_env({"NOETL_WASM_FUEL": "5000000", "NOETL_WASM_TIMEOUT": "2.5"})
    WasmLimits(fuel=5000000, memory=67108864, timeout=2.5)
    >>> WasmLimits.from_env({"NOETL_WASM_MEMORY": "1k"})
    Traceback (most recent call last):
    ...
    kernel.errors.ConfigError: NOETL_WASM_MEMORY must be an integer number of bytes, got '1k'
    """

    fuel: int = 2_000_000_000
    memory: int = 64 * 1024 * 1024
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WasmLimits:
        values: dict[str, Any] = {}
        for field, name, kind, unit in _LIMIT_VARS:
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name} must be {unit}, got {raw!r}") from None
            low, high = _LIMIT_RANGES[field]
            if not low <= value <= high:  # also refuses nan
                raise ConfigError(f"{name} must be between {low} and {high}, got {raw}")
            values[field] = value
        return cls(**values)

    def host(self) -> WasmHost:
        """A :class:`WasmHost` that gives each call these limits."""
        return WasmHost(fuel=self.fuel, memory_limit=self.memory, timeout_s=self.timeout)


_LIMIT_VARS: Final = (
    ("fuel", "NOETL_WASM_FUEL", int, "an integer amount of fuel"),
    ("memory", "NOETL_WASM_MEMORY", int, "an integer number of bytes"),
    ("timeout", "NOETL_WASM_TIMEOUT", float, "a number of seconds"),
)
# What WasmHost accepts (memory: one 64 KiB page at least, 4 GiB at most in wasm32), and an hour for a hang.
_LIMIT_RANGES: Final[dict[str, tuple[float, float]]] = {
    "fuel": (1, 10**15), "memory": (65_536, 2**32), "timeout": (0.001, 3600.0),
}  # fmt: skip


def args_table(args: dict[str, Any], metadata: dict[str, str] | None = None) -> pa.Table:
    """The one-row input table of a step's args.

    >>> args_table({"n": 2, "tags": ["a"], "name": "x"}).to_pylist()
    [{'n': 2, 'name': 'x', 'tags': '["a"]'}]
    """
    arrays: list[pa.Array] = []
    for name in sorted(args):
        value = args[name]
        if isinstance(value, bool):
            arrays.append(pa.array([value], pa.bool_()))
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            arrays.append(pa.array([value], pa.int64()))
        elif isinstance(value, float):
            arrays.append(pa.array([value], pa.float64()))
        elif isinstance(value, str) or value is None:
            arrays.append(pa.array([value], pa.string()))
        else:
            arrays.append(pa.array([_json.encode(value).decode()], pa.string()))
    schema = pa.schema([pa.field(name, a.type) for name, a in zip(sorted(args), arrays)], metadata=metadata)
    return pa.Table.from_arrays(arrays, schema=schema)


class WasmTools:
    """Runs ``tool: wasm`` steps for a data worker: registry look-up (hot reload), call, intents, result."""

    def __init__(self, js: JetStreamContext, topology: Topology, *, host: WasmHost | None = None) -> None:
        self.host = host or WasmHost()
        self.registry = PluginRegistry(js, self.host)
        self.producer = Producer(js, topology)

    async def run(self, tool: WasmTool, ctx: ToolContext) -> Reported:
        from worker.tools.runner import ToolError

        owner = f"{ctx.tenant}/{ctx.project}"
        try:
            record, module = await self.registry.load(owner, tool.plugin, tool.version)
        except (PluginRegistryError, WasmError) as e:
            raise ToolError(e.type, str(e)) from e
        grants = Grants(
            plugin=f"{owner}/{tool.plugin}@v{record.version}", functions=USER_FUNCTIONS, tenant=ctx.tenant,
            project=ctx.project, execution_id=ctx.execution_id, step=ctx.step,
        )  # fmt: skip
        metadata = {"noetl.execution_id": ctx.execution_id, "noetl.step": ctx.step, "noetl.attempt": str(ctx.attempt),
                    "noetl.iteration": "" if ctx.iteration is None else str(ctx.iteration)}  # fmt: skip
        data = to_stream(args_table(tool.args, metadata))
        try:
            done = await asyncio.to_thread(self.host.invoke, module, data, grants=grants)
        except WasmError as e:
            raise ToolError(e.type, str(e)) from e
        result = await self._carry_out(done, record, ctx)
        return Reported(result, {"plugin": {"path": record.path, "version": record.version, "digest": record.digest}})

    async def _carry_out(self, done: Invocation, record: PluginRecord, ctx: ToolContext) -> Any:
        from worker.tools.runner import ToolError

        result: Any = None
        if done.output:
            try:
                table = from_stream(done.output)
            except (pa.ArrowInvalid, OSError) as e:
                raise ToolError("wasm_abi", f"plug-in {record.path} v{record.version}: output is not an Arrow IPC stream: {e}") from e
            result = table.to_pylist() if table.nbytes <= DEFAULT_PAYLOAD_CAP else table
        iteration = "-" if ctx.iteration is None else str(ctx.iteration)
        for i, intent in enumerate(done.intents):
            match intent:
                case LogIntent(message=message):
                    log.info("wasm.log", plugin=record.path, version=record.version, message=message)
                case ResultIntent(table=table):
                    result = table
                case EventIntent() as event:
                    await self.producer.publish(new_event(
                        tenant=event.tenant, project=event.project, affinity=ctx.affinity, execution_id=event.execution_id, type=event.type,
                        step=event.step, attempt=ctx.attempt, payload=event.payload,
                        event_id=f"{ctx.execution_id}:{ctx.step}:{iteration}:{ctx.attempt}:wasm:{i}",
                    ))  # fmt: skip
        return result
