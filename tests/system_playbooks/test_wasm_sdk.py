"""The guest SDK's Arrow IPC stream reader and writer, compiled with ziglang and run in wasmtime.

A C guest (tests/system_playbooks/wasm/arrow_echo.c) reads every batch of its
input and writes the rows back (or, built with -DTRANSFORM, changed values);
pyarrow writes the inputs and reads the outputs. Malformed input must come back
as a negative error code, never as a trap or a read outside the input.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pyarrow as pa
import pyarrow.ipc
import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "system_playbooks" / "wasm_sdk"
GUEST = Path(__file__).parent / "wasm" / "arrow_echo.c"
FUEL = 2_000_000_000
E_TRUNCATED, E_FORMAT, E_UNSUPPORTED, E_SCHEMA = -2, -3, -4, -5

Run = Callable[[bytes], "bytes | int"]


def compile_guest(out: Path, *defines: str) -> Path:
    command = [
        sys.executable, "-m", "ziglang", "cc", "--target=wasm32-freestanding", "-O2", "-nostdlib", "-Wall", "-Wextra",
        "-Werror", "-Wl,--no-entry", "-Wl,--export=alloc", "-Wl,--export=run", "-I", str(SDK),
        *(f"-D{d}" for d in defines), "-o", str(out), str(GUEST), str(SDK / "noetl_arrow.c"),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return out


def runner(path: Path) -> Run:
    config = wasmtime.Config()
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    module = wasmtime.Module.from_file(engine, str(path))
    assert [(i.module, i.name) for i in module.imports] == []  # the SDK imports nothing it does not call

    def run(data: bytes) -> bytes | int:
        store = wasmtime.Store(engine)
        store.set_fuel(FUEL)
        instance = wasmtime.Instance(store, module, [])
        exports = instance.exports(store)
        memory, alloc, call = exports["memory"], exports["alloc"], exports["run"]
        assert isinstance(memory, wasmtime.Memory) and isinstance(alloc, wasmtime.Func) and isinstance(call, wasmtime.Func)
        ptr = alloc(store, len(data))
        assert isinstance(ptr, int) and ptr > 0
        memory.write(store, data, ptr)
        result = call(store, ptr, len(data))
        assert isinstance(result, int)
        if result < 0:
            return result
        start, length = result >> 32, result & 0xFFFFFFFF
        return bytes(memory.read(store, start, start + length))

    return run


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return runner(compile_guest(tmp_path_factory.mktemp("guest") / "echo.wasm"))


@pytest.fixture(scope="module")
def transform(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return runner(compile_guest(tmp_path_factory.mktemp("guest") / "transform.wasm", "TRANSFORM"))


def stream(table: pa.Table, *, max_chunksize: int | None = None, options: pyarrow.ipc.IpcWriteOptions | None = None) -> bytes:
    """Like wasm_sdk.framing.to_stream, with pyarrow's batch size and options (several batches, compression)."""
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=max_chunksize)
    return bytes(sink.getvalue().to_pybytes())


def read(data: bytes | int) -> pa.Table:
    assert isinstance(data, bytes), f"the guest refused the input: {data}"
    table = pyarrow.ipc.open_stream(data).read_all()
    table.validate(full=True)
    return table


TYPES = {"int64": pa.int64(), "int32": pa.int32(), "bool": pa.bool_(), "utf8": pa.string()}
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", "é", "日本語", '"\\\n', "🦀"])
VALUES = {
    "int64": st.integers(-(2**63), 2**63 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "bool": st.booleans(),
    "utf8": TEXT,
}


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    kinds = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=0, max_size=6))
    rows = draw(st.integers(0, 80))
    columns, fields = [], []
    for i, kind in enumerate(kinds):
        nulls = draw(st.booleans())
        values = draw(st.lists(VALUES[kind] | st.none() if nulls else VALUES[kind], min_size=rows, max_size=rows))
        columns.append(pa.array(values, TYPES[kind]))
        fields.append(pa.field(f"c{i}_{kind}" if draw(st.booleans()) else f"列{i}", TYPES[kind], nullable=nulls or draw(st.booleans())))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields)) if kinds else pa.table({})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables(), chunk=st.integers(1, 30))
def test_echo_gives_back_the_same_table(echo: Run, table: pa.Table, chunk: int) -> None:
    out = read(echo(stream(table, max_chunksize=chunk)))
    assert out.schema == table.schema
    assert out.equals(table)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables())
def test_transform_changes_each_valid_value(transform: Run, table: pa.Table) -> None:
    def change(kind: str, v: object) -> object:
        if v is None:
            return None
        if kind == "int64":
            return (int(v) + 1 + 2**63) % 2**64 - 2**63  # type: ignore[call-overload]
        if kind == "int32":
            return (int(v) * 2 + 2**31) % 2**32 - 2**31  # type: ignore[call-overload]
        return (not v) if kind == "bool" else str(v) * 2

    kinds = {field.name: next(k for k, t in TYPES.items() if t == field.type) for field in table.schema}
    expected = pa.Table.from_arrays(
        [pa.array([change(kinds[f.name], v) for v in table.column(f.name).to_pylist()], f.type) for f in table.schema],
        schema=table.schema,
    ) if table.num_columns else table  # fmt: skip
    assert read(transform(stream(table))).equals(expected)


def test_zero_rows_zero_columns_and_slices(echo: Run) -> None:
    empty = pa.table({"a": pa.array([], pa.int64()), "s": pa.array([], pa.string()), "b": pa.array([], pa.bool_())})
    assert read(echo(stream(empty))).equals(empty)
    assert read(echo(stream(pa.table({})))).num_columns == 0
    big = pa.table({"s": pa.array([None if i % 7 == 0 else "ü" * (i % 5) for i in range(300)]), "n": pa.array(range(300))})
    sliced = big.slice(37, 101)
    assert read(echo(stream(sliced))).equals(sliced)


@pytest.mark.parametrize(
    "table",
    [
        pa.table({"f": pa.array([1.5], pa.float64())}),
        pa.table({"u": pa.array([1], pa.uint64())}),
        pa.table({"i": pa.array([1], pa.int16())}),
        pa.table({"l": pa.array([[1]], pa.list_(pa.int64()))}),
        pa.table({"d": pa.array(["a", "b", "a"]).dictionary_encode()}),
        pa.table({"s": pa.array(["a"], pa.large_string())}),
    ],
    ids=["float64", "uint64", "int16", "list", "dictionary", "large_utf8"],
)
def test_types_outside_the_subset_are_refused(echo: Run, table: pa.Table) -> None:
    assert echo(stream(table)) == E_UNSUPPORTED


def test_compressed_bodies_are_refused(echo: Run) -> None:
    table = pa.table({"a": pa.array(range(100), pa.int64())})
    assert echo(stream(table, options=pyarrow.ipc.IpcWriteOptions(compression="zstd"))) == E_UNSUPPORTED


def test_not_a_stream(echo: Run) -> None:
    assert echo(b"") == E_TRUNCATED
    assert echo(b"\xff\xff\xff\xff\x00\x00\x00\x00") == E_TRUNCATED  # end of stream before a schema
    assert echo(b"ARROW1\x00\x00" + bytes(64)) == E_FORMAT  # the file format is not the stream format
    table = pa.table({"a": pa.array([1, 2], pa.int64())})
    data = stream(table)
    assert echo(data[:-8] + data) == E_FORMAT  # a second schema where a batch belongs
    assert echo(data + b"\x00") == E_FORMAT  # bytes after the end-of-stream marker


SAMPLE = pa.table({
    "n": pa.array([1, None, 3, 4], pa.int64()),
    "i": pa.array([7, 8, None, 9], pa.int32()),
    "b": pa.array([True, False, None, True]),
    "s": pa.array(["a", "", None, "ünï"]),
})  # fmt: skip


def test_every_truncation_is_an_error_or_a_prefix_of_the_batches(echo: Run) -> None:
    data = stream(SAMPLE, max_chunksize=2)
    for cut in range(len(data)):
        out = echo(data[:cut])
        if isinstance(out, int):
            assert out in (E_TRUNCATED, E_FORMAT), (cut, out)
        else:  # cut at a message boundary: the batches before it
            assert read(out).equals(SAMPLE.slice(0, read(out).num_rows)), cut


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_never_trap(echo: Run, data: st.DataObject) -> None:
    raw = bytearray(stream(SAMPLE, max_chunksize=3))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, raw[at] ^ 0x01, raw[at] ^ 0x80]))
    out = echo(bytes(raw))  # a trap or fuel exhaustion would raise here
    if isinstance(out, bytes):
        pyarrow.ipc.open_stream(out).read_all().validate()  # whatever it accepted, it wrote a valid stream
    else:  # E_SCHEMA: nulls in a field the corruption made non-nullable, refused by the writer
        assert out in (E_TRUNCATED, E_FORMAT, E_UNSUPPORTED, E_SCHEMA)
