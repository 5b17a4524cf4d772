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
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import msgspec
import pyarrow as pa
import pyarrow.ipc
import structlog
from nats.js import JetStreamContext

from kernel.plugins import PluginRecord, PluginRegistry, PluginRegistryError
from kernel.producer import Producer
from kernel.wasm import Grants, Invocation, WasmError, WasmHost
from kernel.wasm_intents import EventIntent, LogIntent, ResultIntent
from kernel.worker import Reported
from locator.envelope import DEFAULT_PAYLOAD_CAP, new_event
from locator.topology import Topology
from system_playbooks.orchestrate.playbook import WasmTool

if TYPE_CHECKING:
    from system_playbooks.orchestrate.tools import ToolContext

__all__ = ["USER_FUNCTIONS", "WasmTools", "args_table"]

USER_FUNCTIONS: Final = frozenset({"event_publish", "result_put", "log"})
log = structlog.get_logger("noetl.wasm")
_json: Final = msgspec.json.Encoder(order="sorted")


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


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class WasmTools:
    """Runs ``tool: wasm`` steps for a data worker: registry look-up (hot reload), call, intents, result."""

    def __init__(self, js: JetStreamContext, topology: Topology, *, host: WasmHost | None = None) -> None:
        self.host = host or WasmHost()
        self.registry = PluginRegistry(js, self.host)
        self.producer = Producer(js, topology)

    async def run(self, tool: WasmTool, ctx: ToolContext) -> Reported:
        from system_playbooks.orchestrate.tools import ToolError

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
        data = _ipc(args_table(tool.args, metadata))
        try:
            done = await asyncio.to_thread(self.host.invoke, module, data, grants=grants)
        except WasmError as e:
            raise ToolError(e.type, str(e)) from e
        result = await self._carry_out(done, record, ctx)
        return Reported(result, {"plugin": {"path": record.path, "version": record.version, "digest": record.digest}})

    async def _carry_out(self, done: Invocation, record: PluginRecord, ctx: ToolContext) -> Any:
        from system_playbooks.orchestrate.tools import ToolError

        result: Any = None
        if done.output:
            try:
                table = pa.ipc.open_stream(done.output).read_all()
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
