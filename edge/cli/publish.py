"""``noetl-edge publish``: one event from flags or JSON, or many from a JSON-lines file."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edge.cli.output import print_json
from edge.cli.options import UsageError, connect_urls, resolve_topology
from kernel.bootstrap import check_topology
from kernel.connect import close, connect
from kernel.producer import Ack, Producer, Rejected
from locator.envelope import Envelope, EnvelopeError, encode_envelope, envelope_from_dict
from locator.ids import Snowflake
from locator.topology import Topology

MAX_SHOWN_ERRORS = 20


def _event_from_flags(args: argparse.Namespace) -> Envelope:
    missing = [f"--{n}" for n in ("tenant", "project", "type") if getattr(args, n) is None]
    if missing:
        raise EnvelopeError(f"missing {', '.join(missing)} (or give --json / --file)", field=missing[0][2:])
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        raise EnvelopeError(f"--payload is not valid JSON: {e}", field="payload") from e
    data: dict[str, Any] = {
        "tenant": args.tenant,
        "project": args.project,
        "affinity": args.affinity,
        "execution_id": args.execution_id or Snowflake().next_str(),
        "type": args.type,
        "step": args.step,
        "attempt": args.attempt,
        "payload": payload,
        "result_ref": args.result_ref,
        "causation_id": args.causation_id,
    }
    if args.event_id:
        data["event_id"] = args.event_id
    return envelope_from_dict(data, fill=True)


def _event_from_json(text: str) -> Envelope:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EnvelopeError(f"not valid JSON: {e}", field="$") from e
    if not isinstance(data, dict):
        raise EnvelopeError("an envelope must be a JSON object", field="$")
    return envelope_from_dict(data, fill=True)


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        stream: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path!r}: {e.strerror}") from e
    try:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line
    finally:
        if stream is not sys.stdin:
            stream.close()


async def _publish_one(args: argparse.Namespace, topology: Topology, env: Envelope) -> int:
    encode_envelope(env, payload_cap=args.payload_cap)  # over the cap: fail before connecting
    nc = await connect(connect_urls(args, topology), name="noetl-publish")
    try:
        await check_topology(nc.jetstream(), topology)
        ack = await Producer(nc.jetstream(), topology, payload_cap=args.payload_cap).publish(env)
    finally:
        await close(nc)
    print_json(ack)
    return 0


async def _publish_file(args: argparse.Namespace, topology: Topology, events: list[tuple[int, Envelope]], rejected: int) -> int:
    err = Console(stderr=True)
    acked = duplicate = failed = 0
    nc = await connect(connect_urls(args, topology), name="noetl-publish")
    try:
        await check_topology(nc.jetstream(), topology)
        producer = Producer(nc.jetstream(), topology, payload_cap=args.payload_cap)
        with Progress(
            TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err
        ) as progress:
            task = progress.add_task("publish", total=len(events))
            for start in range(0, len(events), args.batch_size):
                chunk = events[start : start + args.batch_size]
                results = await producer.publish_many(
                    [env for _, env in chunk], on_progress=lambda n: progress.advance(task, n)
                )
                for (line, _), result in zip(chunk, results):
                    if isinstance(result, Ack):
                        acked += not result.duplicate
                        duplicate += result.duplicate
                    else:
                        assert isinstance(result, Rejected)
                        failed += 1
                        if failed <= MAX_SHOWN_ERRORS:
                            err.print(f"line {line}: not written: {result.error}", markup=False, highlight=False)
    finally:
        await close(nc)
    print_json({"events": len(events) + rejected, "acked": acked, "duplicate": duplicate, "rejected": rejected + failed})
    if failed:
        return 1
    return 2 if rejected else 0


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    if args.file is None:
        env = _event_from_json(args.json) if args.json is not None else _event_from_flags(args)
        return asyncio.run(_publish_one(args, topology, env))

    events: list[tuple[int, Envelope]] = []
    errors: list[str] = []
    for number, line in _read_lines(args.file):
        try:
            env = _event_from_json(line)
            encode_envelope(env, payload_cap=args.payload_cap)
            events.append((number, env))
        except EnvelopeError as e:
            errors.append(f"line {number}: {e}")
    for message in errors[:MAX_SHOWN_ERRORS]:
        print(message, file=sys.stderr)
    if len(errors) > MAX_SHOWN_ERRORS:
        print(f"… and {len(errors) - MAX_SHOWN_ERRORS} more invalid lines", file=sys.stderr)
    if errors and not args.skip_invalid:
        print(
            f"noetl-edge: error: {len(errors)} invalid line(s) in {args.file}; nothing was published "
            "(fix them, or pass --skip-invalid)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_publish_file(args, topology, events, len(errors)))
