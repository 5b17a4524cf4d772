#!/usr/bin/env python
"""WASM plug-in benchmark: host→guest→host round trip, instantiation, and the compiled row builder vs its Python twin.

What is measured (all in one run, one core, no NATS)
----------------------------------------------------
**Round trip** — a C guest (built here with the ``ziglang`` wheel) whose ``run``
calls one host function (``noetl.log`` with a 9-byte message) and returns its
input range as output:

- ``roundtrip.warm_us``: per call on an already-instantiated module: the host
  writes 64 bytes into guest memory, calls ``run``; the guest calls ``log``,
  whose Python callback copies the message out of guest memory through the
  caller (as the host functions of ``worker/wasm.py`` do); the host reads the
  output range back. **Baseline** (``python_us``): a plain Python function doing
  the same copies (input in, message out through a callback, output back).
- ``roundtrip.bare_call_us``: the same warm instance, a call of ``alloc(0)``:
  host→guest→host with no copy and no host function, i.e. what wasmtime-py's
  call path alone costs (so ``warm_us - bare_call_us`` is the two copies and the
  host function).
- ``roundtrip.invoke_us``: per call through ``worker.wasm.WasmHost.invoke``, what
  a plug-in call really costs: a fresh ``Store`` with fuel, memory limit and
  epoch deadline, instantiation through the grant set's ``Linker``, ``alloc``,
  the copy in, ``run`` (its ``log`` intent parsed and recorded), the copy out.

**Instantiate** — ``instantiate_us``: a fresh ``Store`` plus ``Linker.instantiate``
of the row builder module (no call); against ``compile_ms``: compiling the same
module's bytes (``wasmtime.Module``, what the digest cache saves).

**Row builder** — ``system/materialize``'s pure core on the same input in the
same process: ``python`` is ``rows.build_rows`` (msgspec), ``wasm`` is
``WasmRows`` (Arrow IPC out, ``WasmHost.invoke`` of ``wasm/rows.c``, Arrow IPC
back). The input is one materialize batch: ``--events`` events (the shapes
``bench/fold.py`` uses, several steps per execution with payloads) over
``--executions`` executions, folded with the real fold, one row per
execution with its canonical JSON. Reported as WAL events covered per second
(``events / time``) and rows per second; the outputs must be equal or the run
fails. Building the input table (canonical encoding) is shared by both and
not timed.

Each measurement runs ``--rounds`` times after a warm-up; medians and bests are
reported, ratios on the medians. The single JSON result goes to stdout,
progress to stderr.

Usage: ``python bench/wasm.py [--quick] [--rounds R] [--calls C] [--events N] [--executions E]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import wasmtime

from bench.common import dist_version
from bench.fold import pure_events
from worker.toolchain import build
from worker.wasm import Grants, WasmHost
from projector.fold import WalEvent, fold
from projector.projection import canonical
from system_playbooks.materialize.rows import build_rows, input_table
from system_playbooks.materialize.wasm_rows import WasmRows
from system_playbooks.wasm_sdk.cache import built

ROUNDTRIP_C = r"""
#include "noetl.h"
static const char message[] = "roundtrip";
int64_t run(int32_t ptr, int32_t len) {
    if (noetl_log(message, (int32_t)(sizeof message - 1)) != 0) {
        return noetl_fail(NOETL_E_INPUT);
    }
    return noetl_output((const void *)(uintptr_t)ptr, (uint32_t)len);
}
"""
PAYLOAD = bytes(range(64))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _stats(values: Sequence[float], digits: int = 3, *, rate: bool = False) -> dict[str, Any]:
    """Median, best (the lowest time, or the highest ``rate``) and every round."""
    best = max(values) if rate else min(values)
    return {"median": round(statistics.median(values), digits), "best": round(best, digits),
            "rounds": [round(v, digits) for v in values]}  # fmt: skip


def _per_call_us(fn: Callable[[], object], calls: int, rounds: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
    return out


def roundtrip(host: WasmHost, wasm: bytes, args: argparse.Namespace) -> dict[str, Any]:
    module = wasmtime.Module(host.engine, wasm)
    store = wasmtime.Store(host.engine)
    store.set_fuel(2**62)
    store.set_epoch_deadline(2**62)
    received: list[bytes] = []

    def host_log(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        if ptr + length > memory.data_len(caller):
            return -1
        received.append(bytes(memory.read(caller, ptr, ptr + length)))
        return 0

    linker = wasmtime.Linker(host.engine)
    signature = wasmtime.FuncType([wasmtime.ValType.i32()] * 2, [wasmtime.ValType.i32()])
    linker.define_func("noetl", "log", signature, host_log, access_caller=True)
    exports = linker.instantiate(store, module).exports(store)
    memory, alloc, run = exports["memory"], exports["alloc"], exports["run"]
    assert isinstance(memory, wasmtime.Memory) and isinstance(alloc, wasmtime.Func) and isinstance(run, wasmtime.Func)
    ptr = alloc(store, len(PAYLOAD))

    def warm() -> bytes:
        received.clear()
        memory.write(store, PAYLOAD, ptr)
        packed = run(store, ptr, len(PAYLOAD))
        start = packed >> 32
        return bytes(memory.read(store, start, start + (packed & 0xFFFFFFFF)))

    def python_run(data: bytes, callback: Callable[[bytes], int]) -> bytes:
        if callback(b"roundtrip") != 0:
            raise RuntimeError("log refused")
        return bytes(data)

    def python_log(message: bytes) -> int:
        received.append(bytes(message))
        return 0

    def baseline() -> bytes:
        received.clear()
        return python_run(bytearray(PAYLOAD), python_log)

    checked = host.compile(wasm, name="bench/roundtrip")
    grants = Grants(plugin="bench/roundtrip", functions=frozenset({"log"}), ring="system")

    def invoke() -> bytes:
        return host.invoke(checked, PAYLOAD, grants=grants).output

    def bare() -> object:
        return alloc(store, 0)  # host→guest→host with no host function: what the call alone costs

    assert warm() == PAYLOAD and received == [b"roundtrip"]
    assert baseline() == PAYLOAD and received == [b"roundtrip"]
    first = host.invoke(checked, PAYLOAD, grants=grants)
    assert first.output == PAYLOAD and len(first.intents) == 1
    log("round trip: warm instance, Python baseline, WasmHost.invoke")
    warm_us = _per_call_us(warm, args.calls, args.rounds)
    bare_us = _per_call_us(bare, args.calls, args.rounds)
    python_us = _per_call_us(baseline, args.calls, args.rounds)
    invoke_us = _per_call_us(invoke, max(1, args.calls // 10), args.rounds)
    return {
        "warm_us": _stats(warm_us), "bare_call_us": _stats(bare_us), "python_us": _stats(python_us),
        "invoke_us": _stats(invoke_us),
        "ratio_warm_to_python": round(statistics.median(warm_us) / statistics.median(python_us), 2),
        "ratio_invoke_to_python": round(statistics.median(invoke_us) / statistics.median(python_us), 2),
        "invoke_fuel": first.fuel_used,
    }  # fmt: skip


def instantiate(host: WasmHost, wasm: bytes, args: argparse.Namespace) -> dict[str, Any]:
    module = wasmtime.Module(host.engine, wasm)
    linker = wasmtime.Linker(host.engine)

    def fresh() -> None:
        store = wasmtime.Store(host.engine)
        store.set_fuel(10**9)
        store.set_epoch_deadline(2**62)
        linker.instantiate(store, module)

    log("instantiate vs compile (row builder module)")
    instantiate_us = _per_call_us(fresh, max(1, args.calls // 10), args.rounds)
    compile_ms = [v / 1000 for v in _per_call_us(lambda: wasmtime.Module(host.engine, wasm), 1, args.rounds)]
    return {
        "instantiate_us": _stats(instantiate_us), "compile_ms": _stats(compile_ms),
        "ratio_compile_to_instantiate": round(statistics.median(compile_ms) * 1000 / statistics.median(instantiate_us), 1),
        "module_bytes": len(wasm),
    }  # fmt: skip


def row_input(events: int, executions: int) -> Any:
    by_execution: dict[str, list[WalEvent]] = defaultdict(list)
    for event in pure_events(events, executions):
        by_execution[event.env.execution_id].append(event)
    projections = {x: fold(None, evs) for x, evs in by_execution.items()}
    return input_table((x, i + 1, canonical(p)) for i, (x, p) in enumerate(sorted(projections.items())))


def row_builder(host: WasmHost, args: argparse.Namespace) -> dict[str, Any]:
    table = row_input(args.events, args.executions)
    wasm_rows = WasmRows(host=host)
    python_out, wasm_out = build_rows(table), wasm_rows(table)
    if not wasm_out.equals(python_out):
        raise SystemExit("the compiled row builder and the Python twin disagree: not benchmarking them")
    log(f"row builder: {args.events} events, {table.num_rows} executions, {table.get_total_buffer_size()} input bytes")
    python_s = [us / 1e6 for us in _per_call_us(lambda: build_rows(table), 1, args.rounds)]
    wasm_s = [us / 1e6 for us in _per_call_us(lambda: wasm_rows(table), 1, args.rounds)]
    return {
        "events": args.events, "rows": table.num_rows, "input_bytes": table.get_total_buffer_size(),
        "python_eps": _stats([args.events / s for s in python_s], 0, rate=True),
        "wasm_eps": _stats([args.events / s for s in wasm_s], 0, rate=True),
        "python_rows_per_s": round(table.num_rows / statistics.median(python_s)),
        "wasm_rows_per_s": round(table.num_rows / statistics.median(wasm_s)),
        "ratio_wasm_to_python": round(statistics.median(python_s) / statistics.median(wasm_s), 3),
        "identical": True,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a short run (for tests): few calls, rounds and events")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per measurement (default 7)")
    p.add_argument("--calls", type=int, default=20_000, help="calls per round for per-call costs (default 20000)")
    p.add_argument("--events", type=int, default=20_000, help="events in the row builder's batch (default 20000)")
    p.add_argument("--executions", type=int, default=2_000, help="executions they belong to (default 2000)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.events, args.executions = 2, 200, 600, 60
    if min(args.rounds, args.calls, args.events, args.executions) < 1 or args.executions > args.events:
        p.error("--rounds, --calls, --events, --executions must be >= 1 and --executions <= --events")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    host = WasmHost(timeout_s=600.0)
    try:
        with tempfile.TemporaryDirectory(prefix="noetl-bench-wasm-") as tmp:
            src = Path(tmp) / "roundtrip.c"
            src.write_text(ROUNDTRIP_C)
            log("building the round-trip guest with ziglang")
            roundtrip_wasm = build(src).read_bytes()
        result: dict[str, Any] = {"bench": "wasm", "settings": {k: v for k, v in vars(args).items()}}
        result["roundtrip"] = roundtrip(host, roundtrip_wasm, args)
        result["instantiate"] = instantiate(host, built(Path(REPO_ROOT / "system_playbooks/materialize/wasm/rows.c")), args)
        result["row_builder"] = row_builder(host, args)
    finally:
        host.close()
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["machine"] = {"cpus": os.cpu_count() or 1}
    result["versions"] = {"python": platform.python_version(), "wasmtime": dist_version("wasmtime"),
                          "ziglang": dist_version("ziglang"), "pyarrow": dist_version("pyarrow")}  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
