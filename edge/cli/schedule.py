"""``noetl-edge schedule create|list|show|pause|resume|delete``: schedules straight over NATS (KV ``schedules``).

A create is validated (cron, time zone, interval, names) before connecting and
its playbook is checked in the catalog before anything is stored: bad input
exits 2 with one line and writes nothing. The kernels fire the schedules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable

import msgspec

from edge.cli.options import UsageError, connect_urls, resolve_topology
from edge.cli.output import EXIT_OK, EXIT_RUNTIME, fail, print_json
from kernel.connect import close, connect
from kernel.errors import KernelError
from locator.names import check_name
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.start import UnknownPlaybook
from system_playbooks.schedules.spec import MAX_GRACE_S, ScheduleInvalid, ScheduleSpec, check_spec
from system_playbooks.schedules.store import ScheduleExists, ScheduleStore, ScheduleStoreError, ScheduleView, create_schedule


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _scope(args: argparse.Namespace) -> tuple[str, str]:
    return check_name("tenant", args.tenant), check_name("project", args.project)


def _spec(args: argparse.Namespace) -> ScheduleSpec:
    if not 1 <= args.grace <= MAX_GRACE_S:
        raise UsageError(f"--grace must be from 1 to {MAX_GRACE_S} seconds, got {args.grace}")
    try:
        workload = json.loads(args.workload) if args.workload else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--workload is not valid JSON: {e}") from None
    doc: dict[str, object] = {
        "id": args.id, "playbook": {"path": args.playbook, "version": args.version}, "workload": workload,
        "affinity": args.affinity, "overlap": args.overlap, "catchup": args.catchup, "grace_s": args.grace,
        "paused": args.paused, "timezone": args.timezone,
    }  # fmt: skip
    if args.cron is not None:
        doc["cron"] = args.cron
    if args.every is not None:
        doc["every"] = args.every
    try:
        spec = msgspec.convert(doc, ScheduleSpec)
        check_spec(spec, tenant=args.tenant, project=args.project, now_ms=_now_ms())  # before connecting
    except msgspec.ValidationError as e:
        raise UsageError(f"invalid schedule: {e}") from None
    except ScheduleInvalid as e:
        raise UsageError(f"invalid schedule ({e.field}): {e}") from None
    return spec


async def _with_store(args: argparse.Namespace, work: Callable[[ScheduleStore, Catalog], Awaitable[int]]) -> int:
    topology = resolve_topology(args)
    nc = await connect(connect_urls(args, topology), name="noetl-schedule")
    try:
        js = nc.jetstream()
        try:
            return await work(await ScheduleStore.open(js), await Catalog.open(js))
        except ScheduleStoreError as e:
            raise KernelError(str(e)) from e
    finally:
        await close(nc)


def _print(args: argparse.Namespace, views: list[ScheduleView], *, one: bool) -> None:
    if args.json or not sys.stdout.isatty():
        print_json(views[0] if one else {"schedules": views})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "when", "playbook", "overlap", "catchup", "paused", "next tick", "last tick", "last execution")
    for v in views:
        s = v.schedule
        when = f"cron {s.cron} {s.timezone}" if s.cron else f"every {s.every_s}s"
        version = f"@{s.playbook.version}" if s.playbook.version else ""
        table.add_row(s.id, when, s.playbook.path + version, s.overlap, s.catchup, "yes" if s.paused else "no",
                      v.next_tick or "-", v.last_tick or "-", v.last_execution_id or "-")  # fmt: skip
    Console().print(table)


def _create(args: argparse.Namespace) -> int:
    tenant, project = _scope(args)
    spec = _spec(args)

    async def work(store: ScheduleStore, catalog: Catalog) -> int:
        try:
            schedule = await create_schedule(store, catalog, spec, tenant=tenant, project=project, now_ms=_now_ms())
        except UnknownPlaybook as e:
            raise UsageError(str(e)) from None
        except ScheduleExists as e:
            return fail(str(e), EXIT_RUNTIME)
        _print(args, [await store.view(schedule, now_ms=_now_ms())], one=True)
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


def _list(args: argparse.Namespace) -> int:
    tenant, project = _scope(args)

    async def work(store: ScheduleStore, catalog: Catalog) -> int:
        now = _now_ms()
        _print(args, [await store.view(s, now_ms=now) for s in await store.list(tenant, project)], one=False)
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


def _one(args: argparse.Namespace, action: str) -> int:
    tenant, project = _scope(args)
    schedule_id = check_name("schedule id", args.id)
    missing = f"no schedule {schedule_id!r} in {tenant}/{project}"

    async def work(store: ScheduleStore, catalog: Catalog) -> int:
        if action == "delete":
            if not await store.delete(tenant, project, schedule_id):
                return fail(missing, EXIT_RUNTIME)
            print_json({"tenant": tenant, "project": project, "id": schedule_id, "deleted": True})
            return EXIT_OK
        if action == "show":
            found = await store.get(tenant, project, schedule_id)
            schedule = None if found is None else found[0]
        else:
            schedule = await store.set_paused(tenant, project, schedule_id, paused=action == "pause", now_ms=_now_ms())
        if schedule is None:
            return fail(missing, EXIT_RUNTIME)
        _print(args, [await store.view(schedule, now_ms=_now_ms())], one=True)
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


def run(args: argparse.Namespace) -> int:
    action: str = args.schedule_command
    if action == "create":
        return _create(args)
    if action == "list":
        return _list(args)
    return _one(args, action)
