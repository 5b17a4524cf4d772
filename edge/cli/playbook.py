"""``noetl-edge playbook register|list|show``: the playbook catalog straight over NATS, JSON on stdout."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import BucketNotFoundError

from edge.cli.output import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, fail, print_json
from edge.cli.options import connect_urls, resolve_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from locator.names import check_name
from locator.subjects import CATALOG_BUCKET
from system_playbooks.orchestrate.catalog import Catalog, CatalogError, PlaybookNotFound, VersionConflict, policy_from_env
from system_playbooks.orchestrate.playbook import PlaybookError, Policy, load_playbook

def _policy(args: argparse.Namespace) -> Policy:
    env = policy_from_env(os.environ)  # the tool kinds and nats subjects too (NOETL_TOOL_KINDS, NOETL_NATS_SUBJECTS)
    return msgspec.structs.replace(
        env,
        python_allow=tuple(args.python_allow) if args.python_allow is not None else env.python_allow,
        http_hosts=tuple(args.http_host) if args.http_host is not None else env.http_hosts,
    )


async def _with_catalog(args: argparse.Namespace, work: Callable[[Catalog], Awaitable[int]]) -> int:
    topology = resolve_topology(args)
    nc = await connect(connect_urls(args, topology), name="noetl-playbook")
    try:
        try:
            catalog = await Catalog.open(nc.jetstream())
        except BucketNotFoundError as e:
            raise KernelError(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap first (`noetl-edge up` does it)") from e
        return await work(catalog)
    finally:
        await close(nc)


def _register(args: argparse.Namespace) -> int:
    policy = _policy(args)
    try:
        load_playbook(Path(args.file), policy=policy)  # before connecting: a bad file never touches NATS
    except PlaybookError as e:
        return fail(f"{args.file}: {e}", EXIT_USAGE)

    async def work(catalog: Catalog) -> int:
        try:
            done = await catalog.add(args.tenant, args.project, Path(args.file), policy=policy)
        except VersionConflict as e:
            return fail(str(e), EXIT_RUNTIME)
        except PlaybookError as e:  # an unregistered wasm plug-in or an unset keychain alias: nothing written
            return fail(f"{args.file}: {e}", EXIT_USAGE)
        pb = done.playbook
        print_json({"tenant": args.tenant, "project": args.project, "path": pb.path, "version": pb.version, "created": done.created})
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))


def _list(args: argparse.Namespace) -> int:
    async def work(catalog: Catalog) -> int:
        found = await catalog.list(args.tenant, args.project)
        print_json({"playbooks": [{"path": path, "version": version} for path, version in found]})
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))


def _show(args: argparse.Namespace) -> int:
    if args.version is not None and args.version < 1:
        return fail(f"--version must be at least 1, got {args.version}", EXIT_USAGE)

    async def work(catalog: Catalog) -> int:
        try:
            pb = await catalog.get(args.tenant, args.project, args.path, args.version)
        except PlaybookNotFound as e:
            return fail(str(e), EXIT_RUNTIME)
        except CatalogError as e:
            return fail(str(e), EXIT_USAGE)
        out: dict[str, Any] = {"path": pb.path, "version": pb.version, "playbook": msgspec.to_builtins(pb)}
        print_json(out)
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))


def run(args: argparse.Namespace) -> int:
    check_name("tenant", args.tenant)
    check_name("project", args.project)
    command = {"register": _register, "list": _list, "show": _show}[args.playbook_command]
    return command(args)
