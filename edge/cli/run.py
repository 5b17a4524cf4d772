"""``noetl-edge run PLAYBOOK.yaml``: register, start and (``--wait``) follow an execution to its end.

With ``--wait`` it reads the execution's own WAL subject from its first event,
prints one line per finished step (and the callback path of a waiting one) to
stdout, then the final projection as JSON, folded from exactly the events it
read (the fold is the same pure function the kernel runs). Exit status: 0 when
the execution completed, 1 when it failed, was cancelled, or ``--timeout``
passed first.

With ``--idempotency-key KEY`` the start happens at most once per key in the
tenant's project within the window (:mod:`edge.idempotency`): a repeat
prints the first execution with ``"replayed": true`` (and ``--wait`` follows
it), and the key with another playbook version, workload or affinity exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError

from edge.cli.output import EXIT_OK, EXIT_RUNTIME
from edge.cli.options import UsageError, connect_urls, resolve_topology
from kernel.bootstrap import check_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from edge.idempotency import (
    BadIdempotencyKey,
    IdempotencyConflict,
    IdempotencyStore,
    Start,
    StartRecord,
    check_key,
    start_digest,
)
from kernel.producer import Producer
from locator.command import DEFAULT_POOL
from locator.envelope import Envelope, EnvelopeError, decode_wal_message, new_event
from locator.ids import Snowflake
from locator.names import check_name
from locator.shard import shard_for
from locator.subjects import CATALOG_BUCKET, execution_filter, wal_stream
from projector.fold import WalEvent, fold
from projector.projection import canonical
from system_playbooks.orchestrate.catalog import Catalog, VersionConflict, policy_from_env
from system_playbooks.orchestrate.playbook import PlaybookError, load_playbook

TERMINAL_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})


def _line(seq: int, env: Any) -> str | None:
    """The progress line for an event worth a line, else None."""
    p = env.payload
    if env.type == "step.exit":
        result = json.dumps(p.get("result"), separators=(",", ":"))
        shown = result if len(result) <= 120 else result[:117] + "..."
        ref = f" result_ref={env.result_ref}" if env.result_ref else ""
        return f"step {env.step} COMPLETED attempt={env.attempt} result={shown}{ref}"
    if env.type == "step.failed":
        return f"step {env.step} FAILED error={json.dumps(p.get('error'), separators=(',', ':'))[:200]}"
    if env.type == "step.retry":
        return f"step {env.step} RETRY attempt={env.attempt}"
    # A pinned step's pool: said when its command waits for a worker of that pool and when one takes it.
    if env.type == "command.issued" and p.get("pool") not in (None, DEFAULT_POOL):
        return f"step {env.step} QUEUED pool={p['pool']} command={p.get('command_id')}"
    if env.type == "command.claimed" and p.get("pool") not in (None, DEFAULT_POOL):
        return f"step {env.step} CLAIMED pool={p['pool']} worker={p.get('worker')} attempt={env.attempt}"
    if env.type == "callback.waiting" and isinstance(p.get("child"), dict):
        return f"step {env.step} WAITING child={p['child'].get('execution_id')}"
    if env.type == "callback.waiting":
        return f"step {env.step} WAITING callback={p.get('callback_path')}"
    if env.type in TERMINAL_EVENTS:
        return f"execution {env.execution_id} {env.type.rpartition('.')[2].upper()}"
    return None


async def _follow(args: argparse.Namespace, js: Any, shard: int, shard_count: int, execution_id: str) -> int:
    subject = execution_filter(shard, args.tenant, args.project, execution_id)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await js.subscribe(subject, stream=wal_stream(shard), ordered_consumer=True, config=config)
    deadline = time.monotonic() + args.timeout
    events: list[WalEvent] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"noetl-edge: error: execution {execution_id} did not end within {args.timeout:g}s "
                      "(it goes on; follow it with GET .../executions/{id})", file=sys.stderr)
                return EXIT_RUNTIME
            try:
                msg = await sub.next_msg(timeout=min(left, 1.0))
            except nats.errors.TimeoutError:
                continue
            try:
                env = decode_wal_message(msg.subject, msg.data or b"", shard_count=shard_count)
            except EnvelopeError:
                continue
            events.append(WalEvent(msg.metadata.sequence.stream, env))
            line = _line(msg.metadata.sequence.stream, env)
            if line:
                print(line, flush=True)
            if env.type in TERMINAL_EVENTS:
                break
    finally:
        await sub.unsubscribe()
    projection = fold(None, events)
    assert projection is not None
    sys.stdout.write(canonical(projection).decode() + "\n")
    return EXIT_OK if projection.status == "COMPLETED" else EXIT_RUNTIME


def _idempotency_key(raw: str | None) -> str | None:
    """``--idempotency-key``, checked before anything connects (a bad key is exit 2, nothing written)."""
    try:
        return None if raw is None else check_key(raw)
    except BadIdempotencyKey as e:
        raise UsageError(f"--idempotency-key: {e}") from None


def _requested(args: argparse.Namespace, execution_id: str, playbook: dict[str, Any], workload: dict[str, Any],
               event_id: str | None = None) -> Envelope:
    return new_event(
        tenant=args.tenant, project=args.project, affinity=args.affinity, execution_id=execution_id,
        type="execution.requested", event_id=event_id or f"{execution_id}:requested",
        payload={"playbook": playbook, "workload": workload},
    )


async def _start_once(args: argparse.Namespace, js: Any, producer: Producer, key: str, ref: dict[str, Any],
                      workload: dict[str, Any]) -> Start:
    """The start under ``key``: this run's, or the one an earlier start with the key made (edge/idempotency.py)."""

    async def fresh() -> Envelope:
        return _requested(args, Snowflake().next_str(), ref, workload)

    def again(record: StartRecord) -> Envelope:
        return _requested(args, record.execution_id, record.playbook or ref, workload, record.event_id)

    digest = start_digest(playbook=ref, workload=workload, affinity=args.affinity)
    try:
        return await (await IdempotencyStore.open(js)).start(
            producer, args.tenant, args.project, key, digest=digest, fresh=fresh, again=again
        )
    except IdempotencyConflict as e:
        raise UsageError(f"--idempotency-key: {e}") from None


def run(args: argparse.Namespace) -> int:
    check_name("tenant", args.tenant)
    check_name("project", args.project)
    check_name("affinity", args.affinity, allow_empty=True)
    try:
        workload = json.loads(args.workload) if args.workload else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--workload is not valid JSON: {e}") from None
    if not isinstance(workload, dict):
        raise UsageError("--workload must be a JSON object")
    key = _idempotency_key(args.idempotency_key)
    policy = policy_from_env(os.environ)
    try:
        playbook = load_playbook(Path(args.file), policy=policy)  # before connecting: a bad file writes nothing
    except PlaybookError as e:
        raise UsageError(f"{args.file}: {e}") from None
    topology = resolve_topology(args)

    async def main() -> int:
        nc = await connect(connect_urls(args, topology), name="noetl-run")
        try:
            js = nc.jetstream()
            shard = shard_for(args.tenant, args.project, args.affinity, topology.shard_count)
            await check_topology(js, topology, shard=shard)
            try:
                catalog = await Catalog.open(js)
            except BucketNotFoundError as e:
                raise KernelError(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap first") from e
            try:
                await catalog.add(args.tenant, args.project, Path(args.file), policy=policy)
            except VersionConflict as e:
                raise KernelError(f"{e} (bump `version:` in {args.file})") from e
            except PlaybookError as e:  # an unregistered wasm plug-in or an unset keychain alias
                raise UsageError(f"{args.file}: {e}") from None
            ref = {"path": playbook.path, "version": playbook.version}
            producer = Producer(js, topology)
            replayed: bool | None = None
            if key is None:
                env = _requested(args, Snowflake().next_str(), ref, workload)
                ack = await producer.publish(env)
                execution_id, seq = env.execution_id, ack.seq
            else:
                once = await _start_once(args, js, producer, key, ref, workload)
                execution_id, seq, replayed = once.record.execution_id, once.seq, once.replayed
            started: dict[str, Any] = {"execution_id": execution_id, "playbook": playbook.path,
                                       "version": playbook.version, "seq": seq, "shard": shard}
            if replayed is not None:
                started["replayed"] = replayed
            sys.stdout.write(msgspec.json.encode(started).decode() + "\n")
            sys.stdout.flush()
            if not args.wait:
                return EXIT_OK
            return await _follow(args, js, shard, topology.shard_count, execution_id)
        finally:
            await close(nc)

    return asyncio.run(main())
