"""``noetl-edge credential set|list|show|delete|rotate|rewrap``: the keychain straight over NATS.

Values come from stdin or ``--from-file``, never from an argument (shell
history and ``ps`` would keep them); nothing this command prints holds a value.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge.cli.options import UsageError, connect_urls, default_data_dir, resolve_topology
from edge.cli.output import EXIT_OK, EXIT_RUNTIME, fail, print_json
from kernel.connect import close, connect
from worker.keychain import (
    CredentialMeta,
    Keychain,
    KeychainError,
    PlatformKey,
    Scope,
    UnknownCredential,
    check_alias,
    check_value,
    old_keys_from_env,
)
from locator.names import check_name

VALUE_REFUSED = (
    "a credential value is never taken from the command line (shell history and ps keep it): "
    "pipe it on stdin or use --from-file PATH"
)


def _platform_key(args: argparse.Namespace) -> PlatformKey:
    try:
        return PlatformKey.from_env(data_dir=args.data_dir or default_data_dir())
    except KeychainError as e:
        raise UsageError(str(e)) from e


def _read_value(args: argparse.Namespace) -> bytes:
    if args.given or args.value is not None:
        raise UsageError(VALUE_REFUSED)
    if args.from_file is not None:
        try:
            value = Path(args.from_file).read_bytes()  # verbatim
        except OSError as e:
            raise UsageError(f"cannot read --from-file {args.from_file}: {e.strerror}") from e
    elif sys.stdin.isatty():
        value = getpass.getpass("value (not echoed): ").encode("utf-8")
    else:
        value = sys.stdin.buffer.read()
        # `echo token | noetl-edge credential set …`: the shell's one trailing newline is not part of the value.
        value = value[:-2] if value.endswith(b"\r\n") else value[:-1] if value.endswith(b"\n") else value
    try:
        return check_value(value)
    except KeychainError as e:
        raise UsageError(str(e)) from e


def _scope_alias(args: argparse.Namespace) -> tuple[Scope, str]:
    scope = Scope(check_name("tenant", args.tenant), check_name("project", args.project))
    try:
        return scope, check_alias(args.alias)
    except KeychainError as e:
        raise UsageError(str(e)) from e


async def _with_keychain(args: argparse.Namespace, kek: PlatformKey, work: Callable[[Keychain], Awaitable[int]]) -> int:
    topology = resolve_topology(args)
    nc = await connect(connect_urls(args, topology), name="noetl-credential")
    try:
        return await work(Keychain(nc.jetstream(), kek, old_keks=old_keys_from_env()))
    finally:
        await close(nc)


def _metadata_only() -> PlatformKey:
    # list, show and delete never decrypt or wrap: they need no platform key, so a throwaway stands in.
    return PlatformKey.generate()


def _print_metas(args: argparse.Namespace, metas: list[CredentialMeta], *, one: bool) -> None:
    if args.json or not sys.stdout.isatty():
        print_json(metas[0] if one else {"credentials": metas})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("tenant", "project", "alias", "version", "created_at", "key id", "size")
    for m in metas:
        table.add_row(m.tenant, m.project, m.alias, str(m.version), m.created_at, m.key_id, str(m.size))
    Console().print(table)


def _set(args: argparse.Namespace, *, rotate: bool) -> int:
    scope, alias = _scope_alias(args)
    value = _read_value(args)
    kek = _platform_key(args)

    async def work(chain: Keychain) -> int:
        if rotate and not await chain.exists(scope, alias):
            return fail(f"no credential {alias!r} in tenant {scope.tenant!r} project {scope.project!r} to rotate (use set)", EXIT_RUNTIME)
        print_json(await chain.set(scope, alias, value))
        return EXIT_OK

    return asyncio.run(_with_keychain(args, kek, work))


def _show(args: argparse.Namespace) -> int:
    scope, alias = _scope_alias(args)

    async def work(chain: Keychain) -> int:
        meta = await chain.meta(scope, alias)
        if meta is None:
            return fail(f"no credential {alias!r} in tenant {scope.tenant!r} project {scope.project!r}", EXIT_RUNTIME)
        _print_metas(args, [meta], one=True)
        return EXIT_OK

    return asyncio.run(_with_keychain(args, _metadata_only(), work))


def _list(args: argparse.Namespace) -> int:
    if args.project is not None and args.tenant is None:
        raise UsageError("--project needs --tenant")
    if (args.tenant is None) != (args.project is None):
        raise UsageError("give both --tenant and --project, or neither for every scope")
    scope = None if args.tenant is None else Scope(check_name("tenant", args.tenant), check_name("project", args.project))

    async def work(chain: Keychain) -> int:
        _print_metas(args, await chain.list(scope), one=False)
        return EXIT_OK

    return asyncio.run(_with_keychain(args, _metadata_only(), work))


def _delete(args: argparse.Namespace) -> int:
    scope, alias = _scope_alias(args)

    async def work(chain: Keychain) -> int:
        try:
            await chain.delete(scope, alias)
        except UnknownCredential as e:
            return fail(str(e), EXIT_RUNTIME)
        print_json({"tenant": scope.tenant, "project": scope.project, "alias": alias, "deleted": True})
        return EXIT_OK

    return asyncio.run(_with_keychain(args, _metadata_only(), work))


def _rewrap(args: argparse.Namespace) -> int:
    current = _platform_key(args)
    try:
        if args.new_key_file is not None:
            new = PlatformKey.from_file(Path(args.new_key_file))
        elif os.environ.get("NOETL_KEYCHAIN_NEW_KEY"):
            new = PlatformKey.from_text(os.environ["NOETL_KEYCHAIN_NEW_KEY"], source="NOETL_KEYCHAIN_NEW_KEY")
        else:
            raise UsageError("rewrap needs the new platform key: --new-key-file PATH or NOETL_KEYCHAIN_NEW_KEY (base64 of 32 bytes)")
    except KeychainError as e:
        raise UsageError(str(e)) from e

    async def work(chain: Keychain) -> int:
        count = await chain.rewrap(new)
        if sys.stdout.isatty():
            print(f"rewrapped {count} credentials under platform key {new.id} (was {current.id}); "
                  "now make it the platform key of every process (NOETL_KEYCHAIN_KEY[_FILE] or <data-dir>/keychain.key)")
        else:
            print_json({"rewrapped": count, "key_id": new.id, "previous_key_id": current.id})
        return EXIT_OK

    return asyncio.run(_with_keychain(args, current, work))


def run(args: argparse.Namespace) -> int:
    command: dict[str, Callable[[argparse.Namespace], int]] = {
        "set": lambda a: _set(a, rotate=False),
        "rotate": lambda a: _set(a, rotate=True),
        "show": _show,
        "list": _list,
        "delete": _delete,
        "rewrap": _rewrap,
    }
    return command[args.credential_command](args)

