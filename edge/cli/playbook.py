"""``noetl-edge playbook register|list|show``: the playbook catalog straight over NATS, JSON on stdout."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import BucketNotFoundError

from edge.cli.options import add_log_options, add_topology_options, connect_urls, resolve_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from locator.names import check_name
from locator.subjects import CATALOG_BUCKET
from system_playbooks.orchestrate.catalog import Catalog, CatalogError, PlaybookNotFound, VersionConflict, policy_from_env
from system_playbooks.orchestrate.playbook import PlaybookError, Policy, load_playbook

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "playbook",
        help="register, list and show playbooks in the catalog",
        description="The playbook catalog (KV bucket 'catalog'): versions are immutable, 'latest' is the highest.",
    )
    commands = p.add_subparsers(dest="playbook_command", required=True, metavar="SUBCOMMAND")

    reg = commands.add_parser(
        "register",
        help="validate a playbook file and store its version",
        description="Validate FILE against the operator policy (env NOETL_PYTHON_ALLOW, NOETL_HTTP_HOSTS, "
        "comma-separated; or the flags) before connecting: an invalid file exits 2 with the path of "
        "the error and writes nothing. Registering the same content again is a no-op; a version that "
        "exists with other content exits 1.",
    )
    reg.add_argument("file", metavar="FILE", help="the playbook YAML file")
    reg.add_argument("--python-allow", action="append", default=None, metavar="PREFIX",
                     help="module prefix python tools may call (repeatable; default env NOETL_PYTHON_ALLOW)")
    reg.add_argument("--http-host", action="append", default=None, metavar="HOST",
                     help="host http tools may reach (repeatable; default env NOETL_HTTP_HOSTS)")
    reg.set_defaults(func=_run(_register))

    ls = commands.add_parser("list", help="every (path, version) of a project",
                             description="Print the project's playbooks as JSON, sorted by path and version.")
    ls.set_defaults(func=_run(_list))

    show = commands.add_parser("show", help="one playbook version as JSON",
                               description="Print a playbook as JSON: the latest version, or --version N.")
    show.add_argument("path", metavar="PATH", help="the playbook path, e.g. etl/daily")
    show.add_argument("--version", type=int, default=None, metavar="N", help="the version (default: latest)")
    show.set_defaults(func=_run(_show))

    for q in (reg, ls, show):
        q.add_argument("--tenant", required=True)
        q.add_argument("--project", required=True)
        add_topology_options(q)
        add_log_options(q)


def _print(obj: object) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def _fail(message: str, code: int) -> int:
    print(f"noetl-edge: error: {message}", file=sys.stderr)
    return code


def _policy(args: argparse.Namespace) -> Policy:
    env = policy_from_env(os.environ)
    return Policy(
        python_allow=tuple(args.python_allow) if args.python_allow is not None else env.python_allow,
        http_hosts=tuple(args.http_host) if args.http_host is not None else env.http_hosts,
    )


async def _with_catalog(args: argparse.Namespace, work: Callable[[Catalog], Awaitable[int]]) -> int:
    topology = resolve_topology(args)
    nc = await connect(connect_urls(args, topology), name="noetl-playbook")
    try:
        try:
            kv = await nc.jetstream().key_value(CATALOG_BUCKET)
        except BucketNotFoundError as e:
            raise KernelError(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap first (`noetl-edge up` does it)") from e
        return await work(Catalog(kv))
    finally:
        await close(nc)


def _run(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        check_name("tenant", args.tenant)
        check_name("project", args.project)
        return command(args)

    return run


def _register(args: argparse.Namespace) -> int:
    policy = _policy(args)
    try:
        load_playbook(Path(args.file), policy=policy)  # before connecting: a bad file never touches NATS
    except PlaybookError as e:
        return _fail(f"{args.file}: {e}", EXIT_USAGE)

    async def work(catalog: Catalog) -> int:
        try:
            done = await catalog.add(args.tenant, args.project, Path(args.file), policy=policy)
        except VersionConflict as e:
            return _fail(str(e), EXIT_RUNTIME)
        pb = done.playbook
        _print({"tenant": args.tenant, "project": args.project, "path": pb.path, "version": pb.version, "created": done.created})
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))


def _list(args: argparse.Namespace) -> int:
    async def work(catalog: Catalog) -> int:
        found = await catalog.list(args.tenant, args.project)
        _print({"playbooks": [{"path": path, "version": version} for path, version in found]})
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))


def _show(args: argparse.Namespace) -> int:
    if args.version is not None and args.version < 1:
        return _fail(f"--version must be at least 1, got {args.version}", EXIT_USAGE)

    async def work(catalog: Catalog) -> int:
        try:
            pb = await catalog.get(args.tenant, args.project, args.path, args.version)
        except PlaybookNotFound as e:
            return _fail(str(e), EXIT_RUNTIME)
        except CatalogError as e:
            return _fail(str(e), EXIT_USAGE)
        out: dict[str, Any] = {"path": pb.path, "version": pb.version, "playbook": msgspec.to_builtins(pb)}
        _print(out)
        return EXIT_OK

    return asyncio.run(_with_catalog(args, work))
