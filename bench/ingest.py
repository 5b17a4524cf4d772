#!/usr/bin/env python
"""Ingest benchmark: ``Producer`` against raw nats-py, in one run, on one embedded nats-server.

What is measured
----------------
One ``nats-server`` (``natscluster.server.EmbeddedServer``, JetStream on a temporary
directory) is started and bootstrapped with the default topology's WAL streams.
Then, on the same connection, these phases alternate round by round:

* **baseline** — raw nats-py: ``js.publish_async(subject, data,
  headers={"Nats-Msg-Id": event_id})`` for N envelopes that are already
  encoded (encoding and subject computation are *not* timed), then all ack
  futures are awaited with ``asyncio.gather``.
* **producer** — ``kernel.producer.Producer.publish_many(envelopes)`` on N
  fresh ``Envelope`` objects. Building the objects is not timed; validation,
  encoding, routing, header building, publishing, waiting for the acks and
  building the ``Ack`` results are (they are the producer's cost). The WAL
  streams allow atomic batch publish (bootstrap sets ``allow_atomic``), so
  this is the atomic-batch path (``kernel/atomic.py``).
* **one by one** — the same ``publish_many`` with ``atomic_batches=False``:
  every event its own ``publish_async`` (the path before atomic batches, and
  the path a stream without ``allow_atomic`` takes). ``--no-one-by-one``
  skips it.

Each round runs baseline, producer, one by one; a warm-up round is run first
and not counted. Rates are events per second; the reported ratio is
producer / baseline on the medians (and on the bests). Every phase uses fresh
event ids and execution ids, so nothing is a duplicate, and every ack is checked.
The 1-, 5- and 15-minute load averages at the start and the end are in the JSON.

A secondary figure compares one-by-one publishing: ``await js.publish(...)``
against ``await Producer.publish(env)``.

The single JSON result goes to stdout; progress goes to stderr. The server is
stopped on exit (also on errors and Ctrl-C).

Usage: ``python bench/ingest.py [--events N] [--rounds R] [--payload-bytes B] [--single-events S]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import msgspec  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import PubAck  # noqa: E402

from bench.common import dist_version, nats_server_version  # noqa: E402
from kernel.atomic import atomic_allowed  # noqa: E402
from kernel.bootstrap import bootstrap  # noqa: E402
from kernel.connect import connect  # noqa: E402
from kernel.logs import configure_logging  # noqa: E402
from kernel.producer import MSG_ID, Ack, Producer  # noqa: E402
from natscluster.server import EmbeddedServer  # noqa: E402
from locator import default_topology  # noqa: E402
from locator.envelope import Envelope, encode_envelope, new_event, subject_for  # noqa: E402
from locator.subjects import wal_stream  # noqa: E402
from locator.topology import Topology  # noqa: E402

GOAL_RATIO = 1.0  # issue 18: publish_many at least as fast as raw publish_async
TENANT = "bench"
PROJECTS = tuple(f"p{i}" for i in range(8))  # spread over every shard of the default topology
EXECUTIONS_PER_PHASE = 64
EVENT_TYPE = "user.bench"

RawMessage = tuple[str, bytes, str]  # (subject, encoded envelope, event_id)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- events


def make_payload(payload_bytes: int) -> dict[str, Any]:
    """A payload whose compact JSON encoding is ``payload_bytes`` long (at least the empty-string form)."""
    overhead = len(msgspec.json.encode({"data": ""}))
    return {"data": "x" * max(0, payload_bytes - overhead)}


class EventFactory:
    """Fresh envelopes: new execution ids for every phase, new event ids for every event."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        # Execution ids are decimal int64 strings; start from the clock so reruns never collide.
        self._exec_ids = itertools.count(time.time_ns() // 1000)

    def envelopes(self, n: int) -> list[Envelope]:
        execs = [str(next(self._exec_ids)) for _ in range(EXECUTIONS_PER_PHASE)]
        return [
            new_event(
                tenant=TENANT,
                project=PROJECTS[i % len(PROJECTS)],
                execution_id=execs[i % len(execs)],
                type=EVENT_TYPE,
                payload=self.payload,
            )
            for i in range(n)
        ]

    def raw_messages(self, n: int, shard_count: int) -> list[RawMessage]:
        return [(subject_for(env, shard_count), encode_envelope(env), env.event_id) for env in self.envelopes(n)]


# --------------------------------------------------------------------------- phases


def _check_pubacks(acks: Sequence[PubAck], n: int) -> None:
    if len(acks) != n:
        raise RuntimeError(f"baseline: {len(acks)} acks for {n} messages")
    dups = sum(1 for a in acks if a.duplicate)
    if dups:
        raise RuntimeError(f"baseline: {dups} acks were duplicates (event ids not fresh?)")


def _check_results(results: Sequence[object], n: int) -> None:
    if len(results) != n:
        raise RuntimeError(f"producer: {len(results)} results for {n} events")
    bad = [r for r in results if not isinstance(r, Ack) or r.duplicate]
    if bad:
        raise RuntimeError(f"producer: {len(bad)} of {n} results were not fresh Acks, first: {bad[0]!r}")


async def baseline_batch(js: JetStreamContext, msgs: Sequence[RawMessage]) -> float:
    """Raw ``publish_async`` of pre-encoded messages, then await every ack; returns seconds."""
    gc.collect()
    t0 = time.perf_counter()
    futures = [await js.publish_async(subj, data, headers={MSG_ID: eid}) for subj, data, eid in msgs]
    acks = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    _check_pubacks(acks, len(msgs))
    return elapsed


async def producer_batch(producer: Producer, envs: Sequence[Envelope]) -> float:
    """``Producer.publish_many`` (validation + encoding included); returns seconds."""
    gc.collect()
    t0 = time.perf_counter()
    results = await producer.publish_many(envs)
    elapsed = time.perf_counter() - t0
    _check_results(results, len(envs))
    return elapsed


async def baseline_single(js: JetStreamContext, msgs: Sequence[RawMessage]) -> float:
    """Raw ``js.publish`` awaited one message at a time; returns seconds."""
    gc.collect()
    t0 = time.perf_counter()
    acks = [await js.publish(subj, data, headers={MSG_ID: eid}) for subj, data, eid in msgs]
    elapsed = time.perf_counter() - t0
    _check_pubacks(acks, len(msgs))
    return elapsed


async def producer_single(producer: Producer, envs: Sequence[Envelope]) -> float:
    """``Producer.publish`` awaited one event at a time; returns seconds."""
    gc.collect()
    t0 = time.perf_counter()
    results = [await producer.publish(env) for env in envs]
    elapsed = time.perf_counter() - t0
    _check_results(results, len(envs))
    return elapsed


# --------------------------------------------------------------------------- rounds


@dataclass
class Comparison:
    """Per-round rates (events/s) of both sides of one comparison."""

    baseline: list[float]
    producer: list[float]
    extra: list[float]

    def summary(self, baseline_key: str, producer_key: str) -> dict[str, Any]:
        b_med, p_med = statistics.median(self.baseline), statistics.median(self.producer)
        b_best, p_best = max(self.baseline), max(self.producer)
        return {
            baseline_key: _stats(self.baseline),
            producer_key: _stats(self.producer),
            "ratio_median": round(p_med / b_med, 3),
            "ratio_best": round(p_best / b_best, 3),
            # Each round's producer / the baseline just before it: the pairs share the machine's moment.
            "round_ratios": [round(p / b, 3) for b, p in zip(self.baseline, self.producer)],
        }


def _stats(rates: Sequence[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(rates)),
        "best": round(max(rates)),
        "rounds": [round(r) for r in rates],
    }


async def alternate(
    name: str,
    rounds: int,
    warmup: int,
    n: int,
    run_baseline: Callable[[], Awaitable[float]],
    run_producer: Callable[[], Awaitable[float]],
    run_extra: Callable[[], Awaitable[float]] | None = None,
) -> Comparison:
    """Run baseline, producer (, extra), baseline, …; the first ``warmup`` rounds are not kept."""
    result = Comparison([], [], [])
    for r in range(warmup + rounds):
        b_rate = n / await run_baseline()
        p_rate = n / await run_producer()
        x_rate = n / await run_extra() if run_extra else None
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        extra = f", one by one {x_rate:,.0f} ev/s ({x_rate / b_rate:.2f})" if x_rate else ""
        log(f"{name} {label}: baseline {b_rate:,.0f} ev/s, producer {p_rate:,.0f} ev/s ({p_rate / b_rate:.2f}){extra}")
        if r >= warmup:
            result.baseline.append(b_rate)
            result.producer.append(p_rate)
            if x_rate:
                result.extra.append(x_rate)
    return result


async def stored_messages(js: JetStreamContext, topology: Topology) -> int:
    total = 0
    for shard in range(topology.shard_count):
        info = await js.stream_info(wal_stream(shard))
        total += info.state.messages
    return total


# --------------------------------------------------------------------------- main


async def run(url: str, topology: Topology, args: argparse.Namespace) -> dict[str, Any]:
    nc: NATS = await connect([url], name="bench")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        producer = Producer(js, topology)
        one_by_one = Producer(js, topology, atomic_batches=False)
        factory = EventFactory(make_payload(args.payload_bytes))
        shards = topology.shard_count
        published = 0

        async def batch_b() -> float:
            nonlocal published
            msgs = factory.raw_messages(args.events, shards)
            published += len(msgs)
            return await baseline_batch(js, msgs)

        async def batch_p() -> float:
            nonlocal published
            envs = factory.envelopes(args.events)
            published += len(envs)
            return await producer_batch(producer, envs)

        async def batch_x() -> float:
            nonlocal published
            envs = factory.envelopes(args.events)
            published += len(envs)
            return await producer_batch(one_by_one, envs)

        async def single_b() -> float:
            nonlocal published
            msgs = factory.raw_messages(args.single_events, shards)
            published += len(msgs)
            return await baseline_single(js, msgs)

        async def single_p() -> float:
            nonlocal published
            envs = factory.envelopes(args.single_events)
            published += len(envs)
            return await producer_single(producer, envs)

        log(f"batch: {args.warmup} warm-up + {args.rounds} rounds of {args.events:,} events per side")
        loadavg_start = [round(x, 2) for x in os.getloadavg()]
        batch = await alternate(
            "batch", args.rounds, args.warmup, args.events, batch_b, batch_p, batch_x if args.one_by_one else None
        )
        single: Comparison | None = None
        if args.single_events > 0:
            log(f"single: {args.warmup} warm-up + {args.rounds} rounds of {args.single_events:,} events per side")
            single = await alternate("single", args.rounds, args.warmup, args.single_events, single_b, single_p)

        stored = await stored_messages(js, topology)
        if stored != published:
            raise RuntimeError(f"{published} events published but the WAL streams hold {stored}")
        sample = factory.envelopes(1)[0]
        out: dict[str, Any] = {
            "bench": "ingest",
            "events_per_round": args.events,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "payload_bytes": len(msgspec.json.encode(sample.payload)),
            "message_bytes": len(encode_envelope(sample)),
            "shards": shards,
            **batch.summary("baseline_publish_async_eps", "producer_publish_many_eps"),
            "goal_ratio": GOAL_RATIO,
        }
        out["meets_goal"] = out["ratio_median"] >= GOAL_RATIO
        out["atomic_allowed"] = all(
            [await atomic_allowed(js, wal_stream(n), timeout=5.0) for n in range(topology.shard_count)]
        )
        if batch.extra:
            out["producer_one_by_one_eps"] = _stats(batch.extra)
            out["ratio_one_by_one_median"] = round(statistics.median(batch.extra) / statistics.median(batch.baseline), 3)
        if single is not None:
            out["single"] = {
                "events_per_round": args.single_events,
                **single.summary("baseline_publish_eps", "producer_publish_eps"),
            }
        out["stored_messages"] = stored
        out["loadavg_start"] = loadavg_start
        out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return out
    finally:
        await nc.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark Producer.publish_many / Producer.publish against raw nats-py publishing "
        "(the baseline, measured in the same run on the same embedded nats-server). Prints one JSON object.",
    )
    p.add_argument("--events", type=int, default=20_000, help="events per side per batch round (default 20000)")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds per comparison (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds first (default 1)")
    p.add_argument(
        "--payload-bytes", type=int, default=200, help="JSON size of each event's payload in bytes (default 200)"
    )
    p.add_argument(
        "--single-events",
        type=int,
        default=2_000,
        help="events per side per round of the one-by-one comparison; 0 skips it (default 2000)",
    )
    p.add_argument(
        "--no-one-by-one",
        dest="one_by_one",
        action="store_false",
        help="skip the third phase, publish_many without atomic batches (atomic_batches=False)",
    )
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of the default asyncio loop")
    p.add_argument("--log-level", default="warning", help="kernel log level on stderr (default warning)")
    args = p.parse_args(argv)
    if args.events < 1 or args.rounds < 1 or args.warmup < 0 or args.single_events < 0:
        p.error("--events and --rounds must be >= 1, --warmup and --single-events >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level=args.log_level)
    topology = default_topology()
    loop_name = "asyncio"
    if args.uvloop:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    with tempfile.TemporaryDirectory(prefix="noetl-bench-") as data_dir:
        with EmbeddedServer(data_dir=data_dir, topology=topology, port=0) as server:
            log(f"nats-server at {server.url} (data in {data_dir})")
            result = asyncio.run(run(server.url, topology, args))
    result["loop"] = loop_name
    result["nats_server"] = nats_server_version()
    result["nats_py"] = dist_version("nats-py")
    result["python"] = platform.python_version()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
