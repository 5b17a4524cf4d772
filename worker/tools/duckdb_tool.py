"""``tool: duckdb`` steps: one SQL query over the results of earlier steps, each a table named after its step.

When the orchestrator issues the command, each name in ``tables`` becomes what
templates see as ``steps.<name>`` (its ``result`` inline, or its
``result_ref``). The worker turns each into an Arrow table and registers it
under the step's name in an in-memory DuckDB database:

* a result stored by reference is read from the result store as it was
  stored: a ``pyarrow.Table`` a tool returned, or a list of flat objects
  (``rows``), as its table; any other stored JSON value as below;
* an inline list of objects: one row per object, one column per key;
* an inline object: one row; any other list: one column ``value``, a row per
  item; a scalar: one row with its column ``value``.

The database sees nothing else: no file system, no network, no extension
loading (``enable_external_access`` off, the configuration locked). The
query's answer is the step's result: its rows as JSON objects while they fit
in an event (decimals as numbers), else the Arrow table itself, stored by
reference like any large result. A query that fails is a ``sql_error`` with
DuckDB's message; a cancelled step (timeout) interrupts the query.
"""

from __future__ import annotations

import asyncio
import decimal
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import duckdb
import pyarrow as pa

from locator.envelope import DEFAULT_PAYLOAD_CAP
from projector.results import ResultError
from system_playbooks.orchestrate.playbook import DuckdbTool

if TYPE_CHECKING:
    from worker.tools.runner import ToolContext

__all__ = ["input_table", "run_duckdb"]

_CONFIG: Final[dict[str, Any]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "threads": 1,
    "memory_limit": "1GB",
    "lock_configuration": True,
}


def input_table(value: Any) -> pa.Table:
    """An inline JSON result as the table a query sees.

    >>> input_table([{"a": 1}, {"a": 2}]).to_pylist()
    [{'a': 1}, {'a': 2}]
    >>> input_table(3).to_pylist(), input_table([1, 2]).column_names
    ([{'value': 3}], ['value'])
    """
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        return pa.Table.from_pylist(value)
    if isinstance(value, dict):
        return pa.Table.from_pylist([value])
    if isinstance(value, list):
        return pa.table({"value": pa.array(value)})
    return pa.table({"value": pa.array([value])})


def _tables(tool: DuckdbTool, ctx: ToolContext) -> dict[str, pa.Table]:
    from worker.tools.runner import ToolError

    if not isinstance(tool.tables, Mapping):
        raise ToolError("invalid_tool", "tables was not filled in by the orchestrator (a command issued by hand?)")
    tables: dict[str, pa.Table] = {}
    for name, step in tool.tables.items():
        step = step if isinstance(step, Mapping) else {}
        ref, value = step.get("result_ref"), step.get("result")
        if step.get("status") != "COMPLETED":
            raise ToolError("bad_input", f"step {name!r} has not completed (status {step.get('status')!r}): "
                            "no result to query")  # fmt: skip
        try:
            if ref is not None:
                if ctx.results is None:
                    raise ToolError("unsupported", f"step {name!r}'s result is stored by reference and this runner "
                                    "has no result store")  # fmt: skip
                table, form = ctx.results.read(ref)
                tables[name] = table if form != "json" else input_table(ctx.results.get_json(ref))
            else:
                tables[name] = input_table(value)
        except ResultError as e:
            raise ToolError("result_store", f"step {name!r}: {e}") from e
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise ToolError("bad_input", f"step {name!r}'s result cannot be read as a table: {e}") from e
    return tables


def _query(sql: str, tables: Mapping[str, pa.Table], connections: list[Any]) -> pa.Table | None:
    con = duckdb.connect(":memory:", config=_CONFIG.copy())
    connections.append(con)
    try:
        for name, table in tables.items():
            con.register(name, table)
        relation = con.sql(sql)
        if relation is None:
            return None
        to_arrow = getattr(relation, "to_arrow_table", None) or relation.arrow  # duckdb 2 / 1.x
        answer: pa.Table = to_arrow()
        return answer
    finally:
        con.close()


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


async def run_duckdb(tool: DuckdbTool, ctx: ToolContext) -> Any:
    """Run the query; rows as JSON when small, else the Arrow table (the worker stores it by reference)."""
    from worker.tools.runner import ToolError, builtins_result

    tables = await asyncio.to_thread(_tables, tool, ctx)
    connections: list[Any] = []
    done = threading.Event()

    def query() -> pa.Table | None:
        try:
            return _query(tool.sql, tables, connections)
        finally:
            done.set()

    try:
        answer = await asyncio.to_thread(query)
    except duckdb.Error as e:
        raise ToolError("sql_error", str(e)) from e
    except asyncio.CancelledError:
        if connections and not done.is_set():
            connections[0].interrupt()  # the thread goes on otherwise: stop the query
        raise
    if answer is None:
        return None
    if answer.num_rows > tool.max_rows:
        raise ToolError("too_large", f"the query returned {answer.num_rows} rows, more than max_rows {tool.max_rows}")
    if answer.nbytes <= DEFAULT_PAYLOAD_CAP // 2:
        return builtins_result(_plain(answer.to_pylist()))
    return answer
