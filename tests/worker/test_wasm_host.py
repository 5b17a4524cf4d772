"""The WASM host with real wasmtime and guests compiled by the ziglang wheel: ABI, capability ring, isolation."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import wasmtime

from worker.toolchain import build
from worker.wasm import (
    HOST_FUNCTIONS,
    PAGE,
    Grants,
    WasmAbiError,
    WasmError,
    WasmFuelExhausted,
    WasmHost,
    WasmImportDenied,
    WasmMemoryLimit,
    WasmModule,
    WasmRefused,
    WasmTimeout,
    WasmTrap,
)
from worker.wasm_intents import EventIntent, LogIntent, ObjectIntent, ResultIntent

PROBE = Path(__file__).parent / "wasm" / "probe.c"
ALL = frozenset(HOST_FUNCTIONS)


def user(functions: frozenset[str] = ALL, **kw: str) -> Grants:
    scope = {"tenant": "acme", "project": "web", "execution_id": "42", "step": "score", **kw}
    return Grants(plugin="acme/web/probe", functions=functions, **scope)


@pytest.fixture(scope="module")
def wasm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wasm")
    for variant in ("", "PURE", "SNEAKY"):
        build(PROBE, out / f"probe{variant}.wasm", defines=[variant] if variant else [])
    return out


@pytest.fixture
def host() -> Iterator[WasmHost]:
    h = WasmHost(fuel=50_000_000, memory_limit=4 * 1024 * 1024, timeout_s=30)
    yield h
    h.close()


def module(host: WasmHost, wasm_dir: Path, variant: str = "") -> WasmModule:
    return host.compile((wasm_dir / f"probe{variant}.wasm").read_bytes(), name="acme/web/probe")


def test_echo_round_trip_and_fuel(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir, "PURE")
    result = host.invoke(m, b"e" + bytes(range(256)) * 100, grants=user(frozenset()))
    assert result.output == bytes(range(256)) * 100
    assert result.fuel_used > 0 and result.intents == []
    assert host.invoke(m, b"", grants=user(frozenset())).output == b""


def test_compile_is_cached_by_digest(host: WasmHost, wasm_dir: Path) -> None:
    a, b = module(host, wasm_dir), module(host, wasm_dir)
    assert a.module is b.module and len(a.digest) == 64
    assert module(host, wasm_dir, "PURE").digest != a.digest


# --- the capability ring ----------------------------------------------------------------------------------


def test_ungranted_import_fails_and_names_it(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir)
    with pytest.raises(WasmImportDenied) as e:
        host.invoke(m, b"e", grants=user(frozenset({"log", "event_publish"})))
    assert "acme/web/probe" in str(e.value) and "noetl.object_put" in str(e.value)
    assert e.value.type == "wasm_import_denied"


def test_wasi_is_never_defined(host: WasmHost, wasm_dir: Path) -> None:
    with pytest.raises(WasmImportDenied, match="wasi_snapshot_preview1.fd_write"):
        host.invoke(module(host, wasm_dir, "SNEAKY"), b"e", grants=user())


def test_granted_functions_record_checked_intents(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir)
    assert host.invoke(m, b'p{"type":"user.scored","payload":{"n":3}}', grants=user()).output == b"0"
    result = host.invoke(m, b'p{"type":"user.scored","payload":{"n":3}}', grants=user())
    assert result.intents == [
        EventIntent(type="user.scored", tenant="acme", project="web", execution_id="42", step="score", payload={"n": 3})
    ]
    assert host.invoke(m, b"ghello", grants=user()).intents == [LogIntent(message="hello")]
    assert host.invoke(m, b"oreport.txt\0abc", grants=user()).intents == [ObjectIntent(name="report.txt", data=b"abc")]
    sink = pa.BufferOutputStream()
    table = pa.table({"n": [1, 2]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    put = host.invoke(m, b"r" + sink.getvalue().to_pybytes(), grants=user()).intents
    assert isinstance(put[0], ResultIntent) and put[0].table.equals(table)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'p{"type":"step.exit"}', b"-3"),  # a user plug-in publishes only user.* events
        (b'p{"type":"user.x","execution_id":"43"}', b"-3"),  # ...of its own execution
        (b'p{"type":"user.x","tenant":"other"}', b"-3"),
        (b"p{not json", b"-2"),
        (b'p{"type":"user.x","payload":{"a":"' + b"x" * 70_000 + b'"}}', b"-4"),
        (b"rnot arrow", b"-2"),
        (b"o../etc/passwd\0x", b"-2"),
        (b"g\xff\xfe", b"-2"),
        (b"x", b"-1"),  # out-of-bounds pointer: refused, the host goes on
    ],
)
def test_out_of_scope_or_bad_intents_are_refused(host: WasmHost, wasm_dir: Path, body: bytes, code: bytes) -> None:
    result = host.invoke(module(host, wasm_dir), body, grants=user())
    assert result.output == code and result.intents == []


def test_system_ring_publishes_any_type_but_must_name_the_execution(host: WasmHost, wasm_dir: Path) -> None:
    system = Grants(plugin="system/probe", functions=ALL, ring="system")
    m = module(host, wasm_dir)
    ok = host.invoke(m, b'p{"type":"step.exit","tenant":"a","project":"b","execution_id":"9"}', grants=system)
    assert ok.output == b"0" and ok.intents[0].type == "step.exit"  # type: ignore[union-attr]
    assert host.invoke(m, b'p{"type":"step.exit"}', grants=system).output == b"-2"


def test_bad_grants_are_refused() -> None:
    with pytest.raises(WasmError, match="unknown host functions"):
        Grants(plugin="p", functions=frozenset({"spawn"}), ring="system")
    with pytest.raises(WasmError, match="needs tenant, project and execution_id"):
        Grants(plugin="p", functions=frozenset(), tenant="acme")


# --- isolation --------------------------------------------------------------------------------------------


def test_trap_is_a_typed_readable_error(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir, "PURE")
    with pytest.raises(WasmTrap, match=r"plug-in acme/web/probe trapped: unreachable"):
        host.invoke(m, b"t", grants=user(frozenset()))
    with pytest.raises(WasmTrap, match="integer_division_by_zero"):
        host.invoke(m, b"d", grants=user(frozenset()))
    assert host.invoke(m, b"eok", grants=user(frozenset())).output == b"ok"  # the host goes on


def test_infinite_loop_runs_out_of_fuel(host: WasmHost, wasm_dir: Path) -> None:
    with pytest.raises(WasmFuelExhausted, match="ran out of fuel") as e:
        host.invoke(module(host, wasm_dir, "PURE"), b"l", grants=user(frozenset()))
    assert e.value.type == "wasm_fuel"


def test_infinite_loop_hits_the_epoch_deadline(wasm_dir: Path) -> None:
    host = WasmHost(fuel=10**18, timeout_s=0.2)
    try:
        with pytest.raises(WasmTimeout, match="ran longer than 0.2 s"):
            host.invoke(module(host, wasm_dir, "PURE"), b"l", grants=user(frozenset()))
    finally:
        host.close()


def test_memory_bomb_hits_the_limit(host: WasmHost, wasm_dir: Path) -> None:
    with pytest.raises(WasmMemoryLimit, match="memory limit of 4194304 bytes"):
        host.invoke(module(host, wasm_dir, "PURE"), b"m", grants=user(frozenset()))
    with pytest.raises(WasmMemoryLimit):  # an input bigger than the limit: alloc cannot get it
        host.invoke(module(host, wasm_dir, "PURE"), b"e" + b"x" * (5 * 1024 * 1024), grants=user(frozenset()))


@pytest.mark.parametrize(
    "body",
    [
        b"M",  # doubles its memory until refused (at about half the limit), then unreachable
        b"k64",  # asks for the whole limit in one grow, then unreachable
        b"w64",  # the same, then writes through the pointer the refused grow gave (-1 pages): out of bounds
    ],
)
def test_a_trap_after_a_refused_grow_is_wasm_memory(host: WasmHost, wasm_dir: Path, body: bytes) -> None:
    with pytest.raises(WasmMemoryLimit, match=r"memory limit of 4194304 bytes \(a memory.grow was refused") as e:
        host.invoke(module(host, wasm_dir, "PURE"), body, grants=user(frozenset()))
    assert e.value.type == "wasm_memory"


def test_a_trap_after_a_granted_grow_near_the_limit_stays_wasm_trap(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir, "PURE")
    [initial] = [e.type.limits.min for e in m.module.exports if isinstance(e.type, wasmtime.MemoryType)]
    near = host.memory_limit // PAGE - initial - 2  # leaves two pages of the limit
    assert host.invoke(m, b"w%d" % near, grants=user(frozenset())).output == str(initial).encode()  # granted
    with pytest.raises(WasmTrap, match="trapped: unreachable") as e:
        host.invoke(m, b"k%d" % near, grants=user(frozenset()))
    assert e.value.type == "wasm_trap" and f"({host.memory_limit - 2 * PAGE} bytes" in str(e.value)


def test_output_outside_memory_is_an_abi_error(host: WasmHost, wasm_dir: Path) -> None:
    with pytest.raises(WasmAbiError, match="outside its"):
        host.invoke(module(host, wasm_dir, "PURE"), b"b", grants=user(frozenset()))


def test_modules_that_break_the_abi_are_refused(host: WasmHost) -> None:
    with pytest.raises(WasmAbiError, match="not a valid WASM module"):
        host.compile(b"\0asm garbage", name="bad")
    no_run = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "alloc") (param i32) (result i32) i32.const 0))')
    with pytest.raises(WasmAbiError, match="must export run"):
        host.compile(no_run, name="bad")
    wrong = wasmtime.wat2wasm(
        '(module (import "noetl" "log" (func (param i64))) (memory (export "memory") 1)'
        ' (func (export "alloc") (param i32) (result i32) i32.const 8)'
        ' (func (export "run") (param i32 i32) (result i64) i64.const 0))'
    )
    with pytest.raises(WasmAbiError, match="wrong signature"):
        host.invoke(host.compile(wrong, name="bad"), b"", grants=user())
    big = wasmtime.wat2wasm(
        '(module (memory (export "memory") 200) (func (export "alloc") (param i32) (result i32) i32.const 8)'
        ' (func (export "run") (param i32 i32) (result i64) i64.const 0))'
    )
    with pytest.raises(WasmMemoryLimit, match="asks for 13107200 bytes"):
        host.invoke(host.compile(big, name="big"), b"", grants=user())


def test_concurrent_calls_keep_their_intents_apart(host: WasmHost, wasm_dir: Path) -> None:
    m = module(host, wasm_dir)

    def call(i: int) -> list[str]:
        result = host.invoke(m, b"g" + str(i).encode(), grants=user())
        return [intent.message for intent in result.intents]  # type: ignore[union-attr]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(call, range(40))) == [[str(i)] for i in range(40)]


def test_a_negative_run_result_is_a_refusal(host: WasmHost, wasm_dir: Path) -> None:
    with pytest.raises(WasmRefused, match="run returned error code -5"):
        host.invoke(module(host, wasm_dir, "PURE"), b"f", grants=user(frozenset()))
