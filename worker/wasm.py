"""The WASM plug-in host: one wasmtime ``Engine``, a ``Linker`` per capability set, a fresh ``Store`` per call.

A plug-in reaches the platform only through the host functions it is granted
(:data:`HOST_FUNCTIONS`, module ``noetl``, each ``(ptr: i32, len: i32) -> i32``).
The ``Linker`` of a grant set defines only those functions and no WASI, so a
module importing anything else cannot be instantiated: :class:`WasmImportDenied`
names the import and the plug-in. Every call runs in a new ``Store`` with fuel,
a memory limit and an epoch deadline (one ticker thread per host advances the
epoch while calls run), and each way a guest can misbehave becomes a typed :class:`WasmError`
whose ``type`` the data worker reports in its ``call.error`` event. A trap is replayed once with
twice the memory to tell a trap after a refused ``memory.grow`` (``wasm_memory``) from any other.

ABI: the module exports ``memory``, ``alloc(size: i32) -> i32`` and
``run(ptr: i32, len: i32) -> i64`` returning ``(out_ptr << 32) | out_len``.
Input and output are Arrow IPC stream bytes (see ``docs/plugins.md``).
Host functions copy the guest's bytes out during the call, after checking the
range against the memory's current size, and check each intent against the
grant's scope; the caller carries the intents out only after ``run`` returned.

>>> host = WasmHost(fuel=1_000_000, timeout_s=5)
>>> wat = '''(module (memory (export "memory") 1)
...   (func (export "alloc") (param i32) (result i32) (i32.const 1024))
...   (func (export "run") (param i32 i32) (result i64)
...     (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32)) (i64.extend_i32_u (local.get 1)))))'''
>>> echo = host.compile(wasmtime.wat2wasm(wat), name="demo/echo")
>>> host.invoke(echo, b"hello", grants=Grants(plugin="demo/echo", ring="system")).output
b'hello'
>>> host.close()
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec
import wasmtime

from kernel.errors import KernelError
from worker.wasm_intents import Call, Intent, parse_intent

__all__ = [
    "HOST_FUNCTIONS",
    "Grants",
    "Invocation",
    "WasmAbiError",
    "WasmError",
    "WasmFuelExhausted",
    "WasmHost",
    "WasmImportDenied",
    "WasmMemoryLimit",
    "WasmModule",
    "WasmRefused",
    "WasmTimeout",
    "WasmTrap",
]

HOST_FUNCTIONS: Final = ("event_publish", "result_put", "object_put", "log")
HOST_MODULE: Final = "noetl"
PAGE: Final = 65536
MAX_MEMORY: Final = 65536 * PAGE  # wasm32's 4 GiB
# Fuel a replay may burn past the first run's (unflushed fuel of the trapping block, a few steps past the grow).
REPLAY_FUEL_MARGIN: Final = 1_000_000
# Return codes of the host functions (documented in docs/plugins.md).
OK, E_BOUNDS, E_INVALID, E_DENIED, E_LIMIT = 0, -1, -2, -3, -4


class WasmError(KernelError):
    """A plug-in failed; ``type`` is the short code a ``call.error`` carries, ``plugin`` names the plug-in."""

    type = "wasm_error"

    def __init__(self, message: str, *, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class WasmImportDenied(WasmError):
    """The module imports something its grants do not define (named in the message)."""

    type = "wasm_import_denied"


class WasmTrap(WasmError):
    """The guest trapped (unreachable, out-of-bounds access, division by zero, stack overflow...)."""

    type = "wasm_trap"


class WasmFuelExhausted(WasmError):
    """The guest used up its fuel (an endless or too long computation)."""

    type = "wasm_fuel"


class WasmMemoryLimit(WasmError):
    """The guest needed more linear memory than the host allows."""

    type = "wasm_memory"


class WasmTimeout(WasmError):
    """The guest ran past the wall-clock bound (epoch deadline)."""

    type = "wasm_timeout"


class WasmRefused(WasmError):
    """``run`` returned a negative value: the guest refused its input (``code`` is what it returned)."""

    type = "wasm_refused"


class WasmAbiError(WasmError):
    """The module is not valid WASM or breaks the ABI (missing export, out-of-bounds output...)."""

    type = "wasm_abi"


class Grants(msgspec.Struct, frozen=True, kw_only=True):
    """What one invocation may do: the host functions its Linker defines, and the scope intents must stay in.

    ``ring="user"`` (a tenant's ``tool: wasm``) needs ``tenant``, ``project`` and
    ``execution_id``: its events must be ``user.*`` events of that execution.
    ``ring="system"`` (the project's own plug-ins) may publish any event type.

    >>> Grants(plugin="acme/web/score", functions=frozenset({"log"}), tenant="acme", project="web",
    ...        execution_id="7").ring
    'user'
    >>> Grants(plugin="x", functions=frozenset({"exec"}), ring="system")
    Traceback (most recent call last):
    ...
    worker.wasm.WasmError: plug-in x: unknown host functions ['exec'] (known: event_publish, result_put, object_put, log)
    """

    plugin: str
    functions: frozenset[str] = frozenset()
    ring: Literal["system", "user"] = "user"
    tenant: str | None = None
    project: str | None = None
    execution_id: str | None = None
    step: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(self.functions - set(HOST_FUNCTIONS))
        if unknown:
            known = ", ".join(HOST_FUNCTIONS)
            raise WasmError(f"plug-in {self.plugin}: unknown host functions {unknown} (known: {known})", plugin=self.plugin)
        if self.ring == "user" and not (self.tenant and self.project and self.execution_id):
            raise WasmError(f"plug-in {self.plugin}: a user grant needs tenant, project and execution_id", plugin=self.plugin)


@dataclass(frozen=True)
class WasmModule:
    """A compiled, ABI-checked module; ``digest`` is the sha256 (hex) of its bytes."""

    name: str
    digest: str
    module: wasmtime.Module = field(repr=False)
    imports: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Invocation:
    """The outcome of one call: the guest's output bytes, the checked intents it made, the fuel it burnt."""

    output: bytes
    intents: list[Intent]
    fuel_used: int


@dataclass(frozen=True)
class _Guest:
    """The exports of one instance that the ABI uses."""

    memory: wasmtime.Memory
    alloc: wasmtime.Func
    run: wasmtime.Func


_local = threading.local()


def _guest_bytes(caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
    """The guest's bytes at [ptr, ptr+length), or None when the range is not inside its memory."""
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return None
    ptr, length = ptr & 0xFFFFFFFF, length & 0xFFFFFFFF  # i32 arrive signed; the guest means unsigned
    if ptr + length > memory.data_len(caller):
        return None
    return bytes(memory.read(caller, ptr, ptr + length)) if length else b""


def _host_function(name: str) -> Any:
    def call(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        state: Call | None = getattr(_local, "call", None)
        if state is None:  # not inside WasmHost.invoke: nothing to record into
            return E_DENIED
        try:
            data = _guest_bytes(caller, ptr, length)
            if data is None:
                state.rejected(name, "pointer/length outside guest memory")
                return E_BOUNDS
            return parse_intent(name, data, state)
        except Exception as e:  # noqa: BLE001 - a host function must never unwind into wasmtime
            state.rejected(name, f"host error: {e!r}")
            return E_INVALID

    return call


class _Ticker:
    """Advances the engine's epoch every ``tick`` seconds while a call runs, so epoch deadlines measure wall-clock time.

    Its thread starts with the first call and sleeps while no call runs: a process that never
    (or rarely) runs a guest pays no wake-ups and no GIL hand-offs for it. A deadline counts ticks
    from the epoch at the call's start, so the epoch standing still meanwhile changes nothing.
    """

    def __init__(self, engine: wasmtime.Engine, tick: float) -> None:
        self._engine, self._tick = engine, tick
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """A call starts: tick (from now on, if no other call runs)."""
        with self._cond:
            self._running += 1
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="noetl-wasm-epoch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._running -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self._tick)
            self._engine.increment_epoch()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


class WasmHost:
    """One wasmtime ``Engine`` (fuel and epoch interruption on) for the process; see the module docstring."""

    def __init__(
        self, *, fuel: int = 2_000_000_000, memory_limit: int = 64 * 1024 * 1024, timeout_s: float = 10.0,
        epoch_tick_s: float = 0.01,
    ) -> None:  # fmt: skip
        if fuel < 1 or memory_limit < PAGE or timeout_s <= 0 or epoch_tick_s <= 0:
            raise WasmError("fuel, memory_limit (>= 64 KiB), timeout_s and epoch_tick_s must be positive", plugin="-")
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.fuel, self.memory_limit, self.timeout_s = fuel, memory_limit, timeout_s
        self._deadline_ticks = max(1, math.ceil(timeout_s / epoch_tick_s))
        self._ticker = _Ticker(self.engine, epoch_tick_s)
        self._lock = threading.Lock()
        self._modules: dict[str, wasmtime.Module] = {}
        self._linkers: dict[frozenset[str], wasmtime.Linker] = {}

    def close(self) -> None:
        """Stop the epoch ticker (calls still running then only stop on fuel)."""
        self._ticker.stop()

    def compile(self, wasm: bytes, *, name: str) -> WasmModule:
        """Compile and ABI-check ``wasm`` (cached by sha256 digest); :class:`WasmAbiError` if it cannot be used."""
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            module = self._modules.get(digest)
        if module is None:
            try:
                module = wasmtime.Module(self.engine, wasm)
            except wasmtime.WasmtimeError as e:
                raise WasmAbiError(f"plug-in {name}: not a valid WASM module: {_first_line(e)}", plugin=name) from e
            _check_exports(module, name)
            with self._lock:
                module = self._modules.setdefault(digest, module)
        imports = tuple((i.module, i.name or "") for i in module.imports)
        return WasmModule(name=name, digest=digest, module=module, imports=imports)

    def _linker(self, functions: frozenset[str]) -> wasmtime.Linker:
        with self._lock:
            linker = self._linkers.get(functions)
            if linker is None:
                linker = wasmtime.Linker(self.engine)
                signature = wasmtime.FuncType([wasmtime.ValType.i32()] * 2, [wasmtime.ValType.i32()])
                for name in sorted(functions):
                    linker.define_func(HOST_MODULE, name, signature, _host_function(name), access_caller=True)
                self._linkers[functions] = linker
        return linker

    def invoke(self, module: WasmModule, data: bytes, *, grants: Grants) -> Invocation:
        """Run ``module`` on ``data`` under ``grants`` in a fresh Store; raises a :class:`WasmError` subclass."""
        plugin = grants.plugin
        denied = [f"{mod}.{name}" for mod, name in module.imports if mod != HOST_MODULE or name not in grants.functions]
        if denied:
            granted = ", ".join(sorted(grants.functions)) or "nothing"
            raise WasmImportDenied(
                f"plug-in {plugin} imports {', '.join(denied)}, which it is not granted (granted: {granted})",
                plugin=plugin,
            )
        store = self._store(fuel=self.fuel, memory_limit=self.memory_limit)
        state = Call(grants)
        _local.call = state
        guest: _Guest | None = None
        self._ticker.begin()
        try:
            guest = self._instantiate(store, module, grants)
            packed = self._run(store, guest, data, plugin)
            if packed < 0:
                raise WasmRefused(f"plug-in {plugin} refused its input: run returned error code {packed}", plugin=plugin)
            memory = guest.memory
            out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
            if out_ptr + out_len > memory.data_len(store):
                raise WasmAbiError(
                    f"plug-in {plugin}: run returned output [{out_ptr}, {out_ptr + out_len}) outside its "
                    f"{memory.data_len(store)}-byte memory", plugin=plugin,
                )  # fmt: skip
            output = bytes(memory.read(store, out_ptr, out_ptr + out_len)) if out_len else b""
        except wasmtime.Trap as e:
            raise self._trap_error(e, module, data, grants, store, guest) from e
        except wasmtime.WasmtimeError as e:
            raise self._setup_error(e, plugin, module) from e
        finally:
            self._ticker.end()
            _local.call = None
        return Invocation(output=output, intents=state.intents, fuel_used=self.fuel - store.get_fuel())

    def _store(self, *, fuel: int, memory_limit: int) -> wasmtime.Store:
        store = wasmtime.Store(self.engine)
        store.set_fuel(fuel)
        store.set_limits(memory_size=memory_limit)
        store.set_epoch_deadline(self._deadline_ticks)
        return store

    def _instantiate(self, store: wasmtime.Store, module: WasmModule, grants: Grants) -> _Guest:
        exports = self._linker(grants.functions).instantiate(store, module.module).exports(store)
        memory, alloc, run = exports["memory"], exports["alloc"], exports["run"]
        assert isinstance(memory, wasmtime.Memory) and isinstance(alloc, wasmtime.Func)  # checked by compile()
        assert isinstance(run, wasmtime.Func)
        return _Guest(memory=memory, alloc=alloc, run=run)

    def _run(self, store: wasmtime.Store, guest: _Guest, data: bytes, plugin: str) -> int:
        """Copy ``data`` in through the guest's ``alloc`` and ``run`` it; the packed result."""
        memory = guest.memory
        ptr = guest.alloc(store, len(data)) & 0xFFFFFFFF
        if ptr + len(data) > memory.data_len(store) or (ptr == 0 and data):
            if len(data) + memory.data_len(store) > self.memory_limit:
                raise WasmMemoryLimit(
                    f"plug-in {plugin}: an input of {len(data)} bytes does not fit under the memory limit of "
                    f"{self.memory_limit} bytes", plugin=plugin,
                )  # fmt: skip
            raise WasmAbiError(f"plug-in {plugin}: alloc({len(data)}) returned an unusable pointer {ptr}", plugin=plugin)
        if data:
            memory.write(store, data, ptr)
        packed: int = guest.run(store, ptr, len(data))
        return packed

    def _trap_error(
        self, trap: wasmtime.Trap, module: WasmModule, data: bytes, grants: Grants, store: wasmtime.Store,
        guest: _Guest | None,
    ) -> WasmError:  # fmt: skip
        plugin = grants.plugin
        code = trap.trap_code
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return WasmFuelExhausted(f"plug-in {plugin} ran out of fuel ({self.fuel} units)", plugin=plugin)
        if code == wasmtime.TrapCode.INTERRUPT:
            return WasmTimeout(f"plug-in {plugin} ran longer than {self.timeout_s} s", plugin=plugin)
        name = code.name.lower() if code is not None else "trap"
        used = guest.memory.data_len(store) if guest is not None else 0
        if self._grow_was_refused(module, data, grants, fuel_used=self.fuel - store.get_fuel()):
            return WasmMemoryLimit(
                f"plug-in {plugin} hit the memory limit of {self.memory_limit} bytes (a memory.grow was refused; "
                f"{used} in use when it trapped: {name})", plugin=plugin,
            )  # fmt: skip
        return WasmTrap(f"plug-in {plugin} trapped: {name} ({used} bytes of memory in use)", plugin=plugin)

    def _grow_was_refused(self, module: WasmModule, data: bytes, grants: Grants, *, fuel_used: int) -> bool:
        """Whether the call that just trapped had a ``memory.grow`` refused by the memory limit.

        A refused grow is no trap (it returns -1, and the guest usually traps soon after), and wasmtime-py's
        store limiter has no callback to report it. So the call is replayed in a fresh store with twice the
        limit and only the fuel the first run burnt (plus a margin): the guest is deterministic (same module
        and input, host functions that only record intents), so the replay repeats the first run step for
        step up to its first refused grow, which it is granted, and grows past the limit there. Without a
        refused grow the replay stays within the limit. A single grow past twice the limit is not told apart.
        """
        store = self._store(
            fuel=max(1, min(self.fuel, fuel_used + REPLAY_FUEL_MARGIN)),
            memory_limit=min(2 * self.memory_limit, MAX_MEMORY),
        )
        outer = getattr(_local, "call", None)
        _local.call = Call(grants)  # the replay's intents are thrown away
        guest: _Guest | None = None
        try:
            guest = self._instantiate(store, module, grants)
            self._run(store, guest, data, grants.plugin)
        except (wasmtime.Trap, wasmtime.WasmtimeError, WasmError):
            pass
        finally:
            _local.call = outer
        return guest is not None and guest.memory.data_len(store) > self.memory_limit

    def _setup_error(self, error: wasmtime.WasmtimeError, plugin: str, module: WasmModule) -> WasmError:
        text = _first_line(error)
        for export in module.module.exports:
            if isinstance(export.type, wasmtime.MemoryType) and export.type.limits.min * PAGE > self.memory_limit:
                return WasmMemoryLimit(
                    f"plug-in {plugin} asks for {export.type.limits.min * PAGE} bytes of memory, over the limit of "
                    f"{self.memory_limit} bytes ({text})", plugin=plugin,
                )  # fmt: skip
        if "incompatible import type" in text or "types incompatible" in text:
            return WasmAbiError(f"plug-in {plugin}: an import has the wrong signature ({text})", plugin=plugin)
        return WasmAbiError(f"plug-in {plugin} could not be run: {text}", plugin=plugin)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_exports(module: wasmtime.Module, name: str) -> None:
    found = {e.name: e.type for e in module.exports}
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    wanted = {
        "alloc": ([i32], [i32]),
        "run": ([i32, i32], [i64]),
    }
    if not isinstance(found.get("memory"), wasmtime.MemoryType):
        raise WasmAbiError(f"plug-in {name}: the module does not export its memory as 'memory'", plugin=name)
    for export, (params, results) in wanted.items():
        ty = found.get(export)
        if not isinstance(ty, wasmtime.FuncType) or list(ty.params) != params or list(ty.results) != results:
            raise WasmAbiError(
                f"plug-in {name}: the module must export {export}({', '.join(map(str, params))}) -> "
                f"{', '.join(map(str, results))}", plugin=name,
            )  # fmt: skip
