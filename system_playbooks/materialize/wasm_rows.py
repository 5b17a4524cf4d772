"""The compiled row builder: ``wasm/rows.c`` run in a :class:`~worker.wasm.WasmHost`, same contract as :func:`rows.build_rows`.

The guest is granted no host function (it only computes), under the system
ring. Its input is cut into chunks of at most ``chunk_bytes`` of projection
JSON, so one invocation's memory stays bounded whatever the batch size; the
outputs are concatenated in order.

>>> rows = WasmRows()
>>> table = input_table([("7", 3, b'{"event_count":2,"execution_id":"7","last_seq":9,"project":"p",'
...                                b'"status":"RUNNING","tenant":"t"}')])
>>> [(r["execution_id"], r["status"], r["pointer"]) for r in rows(table).to_pylist()]
[('7', 'RUNNING', False)]
>>> rows.close()
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from worker.toolchain import BuildError
from worker.wasm import Grants, WasmError, WasmHost, WasmModule
from system_playbooks.materialize.rows import INPUT, OUTPUT, RowError, input_table
from system_playbooks.wasm_sdk.cache import built
from system_playbooks.wasm_sdk.framing import from_stream, to_stream

ROOT: Final = Path(__file__).resolve().parents[2]
SOURCE: Final = Path(__file__).resolve().parent / "wasm" / "rows.c"
PLUGIN: Final = "system/materialize"
CHUNK_BYTES: Final = 8 * 1024 * 1024
MEMORY_LIMIT: Final = 256 * 1024 * 1024

__all__ = ["SOURCE", "WasmRows", "input_table"]


class WasmRows:
    """Arrow table in, Arrow table out, computed by the guest built from ``source`` (relative paths: to the repo root)."""

    def __init__(self, source: Path | str = SOURCE, *, host: WasmHost | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        path = Path(source)
        self.source = path if path.is_absolute() else ROOT / path
        if not self.source.is_file():  # refused when the plug-in is loaded, not at its first batch
            raise RowError(f"{PLUGIN}: module source {self.source} does not exist")
        self._own_host = host is None
        self._host = host
        self.chunk_bytes = chunk_bytes
        self._module: WasmModule | None = None
        self._lock = threading.Lock()
        self._grants = Grants(plugin=PLUGIN, functions=frozenset(), ring="system")

    @property
    def host(self) -> WasmHost:
        with self._lock:
            if self._host is None:
                self._host = WasmHost(memory_limit=MEMORY_LIMIT)
            return self._host

    def module(self) -> WasmModule:
        """The compiled module (built from source on first use, then cached); :class:`RowError` if it cannot be."""
        if self._module is None:
            try:
                wasm = built(self.source)
            except BuildError as e:
                raise RowError(f"{PLUGIN}: cannot build {self.source}: {e}") from e
            try:
                self._module = self.host.compile(wasm, name=PLUGIN)
            except WasmError as e:
                raise RowError(str(e)) from e
        return self._module

    def invoke(self, data: bytes) -> bytes:
        """One guest call on Arrow IPC bytes (the raw contract, as the benchmarks measure it)."""
        try:
            return self.host.invoke(self.module(), data, grants=self._grants).output
        except WasmError as e:
            raise RowError(f"{PLUGIN}: the compiled row builder failed: {e}") from e

    def __call__(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(INPUT):
            raise RowError(f"row builder input must have the schema {INPUT}, not {table.schema}")
        outputs = []
        for chunk in self._chunks(table):
            try:
                out = from_stream(self.invoke(to_stream(chunk)))
            except pa.ArrowInvalid as e:
                raise RowError(f"{PLUGIN}: the compiled row builder wrote an unreadable stream: {e}") from e
            if not out.schema.equals(OUTPUT):
                raise RowError(f"{PLUGIN}: the compiled row builder wrote the schema {out.schema}, not {OUTPUT}")
            outputs.append(out)
        return pa.concat_tables(outputs).combine_chunks()

    def _chunks(self, table: pa.Table) -> list[pa.Table]:
        sizes = pc.fill_null(pc.binary_length(table.column("projection")), 0).to_pylist()
        chunks, start, total = [], 0, 0
        for i, size in enumerate(sizes):
            if total and total + size > self.chunk_bytes:
                chunks.append(table.slice(start, i - start))
                start, total = i, 0
            total += size
        chunks.append(table.slice(start))
        return chunks

    def close(self) -> None:
        """Stop the host's epoch ticker if this builder made the host."""
        if self._own_host and self._host is not None:
            self._host.close()
