"""``noetl-edge replay``: one execution's history read straight from its shard's WAL.

Nothing but the WAL is read (the KV cache and the snapshots may be wiped):
an ordered consumer on the execution's subject, poison skipped exactly as the
pump skips it. The history is shown as a timeline, optionally with the
projection folded from it (``--state``, ``--diff``), written as an Arrow table
(``--export``), followed live (``--follow``) or checked against the playbook
(``--check``: exit 3 at the first decision the playbook would not make).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from datetime import datetime
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError

from edge.cli import replay_output as out
from edge.cli.options import UsageError, objects_root, resolve_topology, stop_on_signals
from kernel.connect import close, connect
from kernel.errors import KernelError
from kernel.scrub import scrub_envelope
from locator.envelope import EnvelopeError, decode_wal_message
from locator.names import check_execution_id, check_name, check_step
from locator.shard import shard_for
from locator.subjects import CATALOG_BUCKET, execution_filter, wal_stream
from locator.urn import Urn, parse_urn
from projector.archive import HistoryArchive
from projector.errors import ProjectorError
from projector.fold import WalEvent
from projector.replay import history
from projector.timeline import parse_ts, timeline
from system_playbooks.orchestrate.catalog import Catalog, CatalogError
from system_playbooks.orchestrate.check import check
from system_playbooks.orchestrate.children import ChildLimits, LimitError
from system_playbooks.orchestrate.playbook import Playbook

EXIT_DIVERGED = 3


def target(args: argparse.Namespace) -> Urn:
    """The execution named by a URN, or by an id with ``--tenant`` and ``--project``."""
    if args.target.startswith("noetl:"):
        urn = parse_urn(args.target)
        if urn.step is not None:
            raise UsageError(f"{args.target} names a result, not an execution")
        for flag, value, want in (("--tenant", args.tenant, urn.tenant), ("--project", args.project, urn.project),
                                  ("--affinity", args.affinity, urn.affinity)):
            if value is not None and value != want:
                raise UsageError(f"{flag} {value!r} disagrees with the URN ({want!r})")
        return urn
    if args.tenant is None or args.project is None:
        raise UsageError("give a URN (noetl://<tenant>/<project>/executions/<id>) or an id with --tenant and --project")
    return Urn(check_name("tenant", args.tenant), check_name("project", args.project),
               check_execution_id(args.target), check_name("affinity", args.affinity or "", allow_empty=True))


def _check_args(args: argparse.Namespace) -> datetime | None:
    if args.step is not None:
        check_step(args.step)
    for flag, value in (("--until-seq", args.until_seq), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.diff is not None and not 0 <= args.diff[0] <= args.diff[1]:
        raise UsageError(f"--diff A B needs 0 <= A <= B, got {args.diff[0]} {args.diff[1]}")
    if args.against_version is not None and not args.check:
        raise UsageError("--against-version needs --check")
    if args.follow and (args.json or args.until_seq or args.as_of or args.diff or args.check or args.export):
        raise UsageError("--follow prints events as they come: it cannot be combined with --json, --until-seq, "
                         "--as-of, --diff, --check or --export")
    if args.as_of is None:
        return None
    as_of = parse_ts(args.as_of)
    if as_of is None:
        raise UsageError(f"--as-of must be an ISO 8601 time with a zone, e.g. 2026-11-22T08:00:00Z, got {args.as_of!r}")
    return as_of


def child_limits() -> ChildLimits:
    """The child-execution limits the kernels run with (``NOETL_CHILD_MAX_DEPTH``, ``NOETL_CHILD_MAX_FANOUT``)."""
    try:
        return ChildLimits.from_env()
    except LimitError as e:
        raise UsageError(str(e)) from None


def archive_of(args: argparse.Namespace) -> HistoryArchive:
    """The history archive in the object store the kernels use (``--data-dir`` or ``NOETL_OBJECTS_URL``)."""
    return HistoryArchive(objects_root(args))


async def read_history(js: JetStreamContext, urn: Urn, shard: int, shard_count: int, args: argparse.Namespace,
                       as_of: datetime | None) -> list[WalEvent]:
    events: list[WalEvent] = []
    with out.progress_bar(f"reading {urn.execution_id}") as progress:
        async for event in history(js, shard=shard, shard_count=shard_count, tenant=urn.tenant, project=urn.project,
                                   execution_id=urn.execution_id, limit=args.limit, until_seq=args.until_seq,
                                   progress=progress, archive=archive_of(args)):
            if as_of is not None:
                at = parse_ts(event.env.ts)
                if at is not None and at > as_of:
                    break
            events.append(event)
    return events


async def _playbook(js: JetStreamContext, urn: Urn, events: list[WalEvent], version: int | None) -> Playbook:
    """The playbook to check with: ``version``, else the one the execution was pinned to (or asked for)."""
    ref: Any = None
    for _, env in events:
        if env.type == "execution.started" and isinstance(env.payload.get("playbook"), dict):
            ref = env.payload["playbook"]
            break
        if env.type == "execution.requested":
            ref = env.payload.get("playbook")
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
        raise UsageError(f"execution {urn.execution_id} names no playbook: there are no decisions to check")
    try:
        kv = await js.key_value(CATALOG_BUCKET)
    except BucketNotFoundError as e:
        raise KernelError(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap first") from e
    wanted = version if version is not None else ref.get("version")
    try:
        return await Catalog(kv).get(urn.tenant, urn.project, ref["path"], wanted if isinstance(wanted, int) else None)
    except CatalogError as e:
        raise KernelError(f"cannot check against the catalog: {e}") from e


async def follow(js: JetStreamContext, urn: Urn, shard: int, shard_count: int, after: int, previous_ts: str | None,
                 args: argparse.Namespace) -> None:
    """Print the execution's new events until SIGINT/SIGTERM."""
    stop = stop_on_signals()
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
    sub = await js.subscribe(execution_filter(shard, urn.tenant, urn.project, urn.execution_id),
                             stream=wal_stream(shard), ordered_consumer=True, config=config, inactive_threshold=60.0)
    out.note(f"following {urn} after seq {after}: Ctrl-C to stop")
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(stop.wait())
            getter = asyncio.ensure_future(sub.next_msg(timeout=None))
            await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, getter):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task})  # retrieved here, never reported as "never retrieved"
            if getter.cancelled() or stop.is_set():
                if not getter.cancelled():
                    getter.exception()  # a message or an error that came with the stop: dropped, not reported
                break
            msg = getter.result()
            try:
                env = decode_wal_message(msg.subject, msg.data or b"", shard_count=shard_count)
            except EnvelopeError as e:
                out.note(f"seq {msg.metadata.sequence.stream}: poison skipped ({e})")
                continue
            if (env.tenant, env.project) != (urn.tenant, urn.project):
                continue
            masked = scrub_envelope(env)
            for row in timeline([WalEvent(msg.metadata.sequence.stream, masked)], previous_ts=previous_ts):
                previous_ts = row.ts
                if args.step is None or row.step == args.step:
                    out.follow_row(row, jsonl=args.jsonl)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def run(args: argparse.Namespace) -> int:
    urn = target(args)
    as_of = _check_args(args)
    topology = resolve_topology(args)
    shard = shard_for(urn.tenant, urn.project, urn.affinity, topology.shard_count)
    urls = [args.nats_url] if args.nats_url else list(topology.cell_for_shard(shard).urls)

    async def main() -> int:
        nc = await connect(urls, name="noetl-replay")
        try:
            js = nc.jetstream()
            try:
                events = await read_history(js, urn, shard, topology.shard_count, args, as_of)
            except ProjectorError as e:
                raise KernelError(str(e)) from e
            except nats.errors.Error as e:
                raise KernelError(f"cannot read {wal_stream(shard)}: {e!r} (is it bootstrapped?)") from e
            mine = [e for e in events if (e.env.tenant, e.env.project) == (urn.tenant, urn.project)]
            if not mine and not args.follow:
                raise KernelError(f"unknown execution {urn.execution_id} of {urn.tenant}/{urn.project}"
                                  + (" (no event up to the stop you gave)" if events or args.until_seq or as_of else ""))
            report = None
            if args.check:
                report = check(mine, await _playbook(js, urn, mine, args.against_version), limits=child_limits())
            code = out.show(urn, shard, mine, args, report)
            if args.export:
                out.export(mine, args)
            if args.follow:
                last = mine[-1] if mine else None
                await follow(js, urn, shard, topology.shard_count, last.seq if last else 0,
                             last.env.ts if last else None, args)
            return EXIT_DIVERGED if report is not None and report.divergence is not None else code
        finally:
            await close(nc)

    try:
        return asyncio.run(main())
    except BrokenPipeError:  # `| head`: the reader is gone, nothing more to say
        sys.stderr.close()
        return 0

