"""``noetl-edge plugin build|register|list|show``: WASM plug-ins, built with the ziglang wheel, kept in the registry."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from edge.cli.output import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, fail, print_json
from edge.cli.options import UsageError, connect_urls, resolve_topology
from kernel.connect import close, connect
from worker.plugins import (
    PluginNotFound,
    PluginRegistry,
    PluginRegistryError,
    check_owner,
)
from worker.toolchain import BuildError, build
from worker.wasm import WasmError, WasmHost

def _owner(args: argparse.Namespace) -> str:
    if args.system == bool(args.tenant or args.project) or (not args.system and not (args.tenant and args.project)):
        raise UsageError("name the owner: --tenant T --project P, or --system")
    try:
        return check_owner("system" if args.system else f"{args.tenant}/{args.project}")
    except PluginRegistryError as e:
        raise UsageError(str(e)) from None


async def _with_registry(args: argparse.Namespace, work: Callable[[PluginRegistry], Awaitable[int]]) -> int:
    topology = resolve_topology(args)
    nc = await connect(connect_urls(args, topology), name="noetl-plugin")
    host = WasmHost()
    try:
        return await work(PluginRegistry(nc.jetstream(), host))
    finally:
        host.close()
        await close(nc)


def _build(args: argparse.Namespace) -> int:
    src = Path(args.src)
    try:
        out = build(src, Path(args.output) if args.output else None, defines=args.define or ())
    except BuildError as e:
        if e.output:
            print(e.output, file=sys.stderr)
        return fail(str(e), EXIT_USAGE)
    data = out.read_bytes()
    print_json({"wasm": str(out), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    owner = _owner(args)
    try:
        wasm = Path(args.wasm).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {args.wasm}: {e}") from None

    async def work(registry: PluginRegistry) -> int:
        try:
            record, created = await registry.register(owner, args.path, wasm)
        except (PluginRegistryError, WasmError) as e:
            return fail(str(e), EXIT_USAGE)
        print_json({**msgspec.to_builtins(record), "created": created})
        return EXIT_OK

    return asyncio.run(_with_registry(args, work))


def _list(args: argparse.Namespace) -> int:
    owner = _owner(args)

    async def work(registry: PluginRegistry) -> int:
        print_json({"plugins": msgspec.to_builtins(await registry.list(owner))})
        return EXIT_OK

    return asyncio.run(_with_registry(args, work))


def _show(args: argparse.Namespace) -> int:
    owner = _owner(args)
    if args.version is not None and args.version < 1:
        raise UsageError(f"--version must be at least 1, got {args.version}")

    async def work(registry: PluginRegistry) -> int:
        try:
            record = await registry.record(owner, args.path, args.version)
        except PluginNotFound as e:
            return fail(str(e), EXIT_RUNTIME)
        except PluginRegistryError as e:
            return fail(str(e), EXIT_USAGE)
        active = await registry.record(owner, args.path)
        print_json({**msgspec.to_builtins(record), "active": record.version == active.version})
        return EXIT_OK

    return asyncio.run(_with_registry(args, work))


def run(args: argparse.Namespace) -> int:
    command = {"build": _build, "register": _register, "list": _list, "show": _show}[args.plugin_command]
    return command(args)
