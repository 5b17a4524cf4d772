#!/usr/bin/env python
"""Fold benchmark: the kernel's pump + ``system/project`` against a raw pull-and-ack loop, in one run.

What is measured
----------------
One ``nats-server`` (``natscluster.server.EmbeddedServer``, JetStream on a temporary
directory) is started and bootstrapped with the default topology (4 shards).
Every round then:

1. purges the ``WAL_<shard>`` streams and publishes N fresh events (fresh
   execution ids, fresh event ids) with ``Producer.publish_many`` — *not timed*.
   The events are realistic: per execution, steps of ``step.enter``,
   ``command.issued``, ``user.progress`` and ``step.exit`` with small payloads,
   executions interleaved (as concurrent executions write them), spread evenly
   over all 4 shards;
2. **baseline** — raw nats-py on the same N messages: one fresh durable pull
   consumer per shard (the pump's consumer config: AckPolicy.ALL,
   ``max_ack_pending`` = batch), ``fetch(batch)`` and ``ack_sync()`` of the
   last message of each batch (AckAll, like the pump), no decoding; the 4
   shards run concurrently on one connection. Timed from consumer creation to
   the last shard's last ack;
3. **kernel** — on the same N messages: one ``kernel.pump.Pump`` per shard
   feeding the ``system/project`` plug-in, built exactly as
   ``kernel/runtime.py`` builds them (``system_manifests(["project"])``,
   ``load_plugin``, ``context_for`` with a ``KvProjectionCache`` and a
   ``SnapshotStore``), with fresh consumer names. Timed from starting the pump
   tasks (consumer creation included, as in the baseline) until every pump has
   acked all of its shard's events (``PumpStats.events``, counted only after
   the batch's KV writes returned and its ack was sent; the pump does not wait
   for the ack's confirmation). Then, *not timed*: the consumers' info must
   show ``num_pending == 0`` and, within 5 s, ``num_ack_pending == 0``, and every execution's KV entry must hold the
   expected ``last_seq`` and ``event_count``.

A warm-up round is run first and not counted; rates are events per second and
the reported ratio is kernel / baseline on the medians (and on the bests);
``ratio_paired_median`` is the median of the per-round ratios (each pair ran
back to back on the same messages, so it is steadier on a busy host). The
client side is CPU-bound, so this process's CPU time per event over each timed
window is reported too (``*_cpu_us_per_event``, ``ratio_cpu``), with the 1-min
load average before and after. A phase that fails a batch, dead-letters an
event or stalls aborts the run instead of hanging.

**Pure fold** — ``projector.fold.fold(None, events)`` on pre-built
``WalEvent`` objects, no I/O, one core: ``grouped`` (many executions,
interleaved, grouped per execution as the plug-in does — grouping included in
the time) and ``single_execution`` (one long history). ``plugin_cpu`` adds the
rest of the plug-in's CPU path around the fold, without NATS: the events are
cut into pump-sized batches, and per batch and execution the previous value is
decoded from its KV bytes (``decode_entry``), folded (``fold`` copies it) and
encoded again (``canonical``).

The single JSON result goes to stdout; progress goes to stderr. The server is
stopped on exit (also on errors and Ctrl-C).

Usage: ``python bench/fold.py [--events N] [--executions E] [--rounds R] [--pure-events P]``
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import nats.errors  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: E402

from bench.common import dist_version, nats_server_version  # noqa: E402
from kernel.bootstrap import bootstrap  # noqa: E402
from kernel.connect import connect  # noqa: E402
from kernel.host import Manifest, Plugin, context_for, load_plugin, system_manifests  # noqa: E402
from kernel.logs import configure_logging  # noqa: E402
from kernel.producer import Ack, Producer  # noqa: E402
from kernel.pump import Pump  # noqa: E402
from natscluster.server import EmbeddedServer  # noqa: E402
from locator import default_topology  # noqa: E402
from locator.envelope import ENVELOPE_VERSION, Envelope, new_event, now_ts  # noqa: E402
from locator.shard import shard_for  # noqa: E402
from locator.subjects import wal_stream, wal_subjects  # noqa: E402
from locator.topology import Topology  # noqa: E402
from projector.cache import KvProjectionCache, decode_entry  # noqa: E402
from projector.fold import WalEvent, fold  # noqa: E402
from projector.projection import Projection, canonical  # noqa: E402
from projector.snapshots import SnapshotStore  # noqa: E402

GOAL_RATIO = 0.5
GOAL_PURE_FOLD_EPS = 200_000
TENANT = "bench"
PLUGIN = "project"
STEPS_PER_EXECUTION = 25  # step names cycle over this many (long histories revisit their steps)
FETCH_WAIT = 1.0  # the pump's default fetch_wait
ACK_MODE = "AckPolicy.ALL, ack_sync() of the last message of each fetched batch (as kernel.pump does)"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- events


def _projects(shard_count: int, per_shard: int = 2) -> tuple[str, ...]:
    """Project names ordered so that execution ``i`` (project ``i % len``) lands on shard ``i % shard_count``."""
    by_shard: dict[int, list[str]] = {s: [] for s in range(shard_count)}
    for i in itertools.count():
        name = f"p{i}"
        shard = shard_for(TENANT, name, "", shard_count)
        if len(by_shard[shard]) < per_shard:
            by_shard[shard].append(name)
        if all(len(v) == per_shard for v in by_shard.values()):
            break
    return tuple(by_shard[s][k] for k in range(per_shard) for s in range(shard_count))


def event_shape(ordinal: int) -> tuple[str, str, int | None, dict[str, Any]]:
    """(type, step, attempt, payload) of an execution's ``ordinal``-th event: enter, issue, progress, exit."""
    step = f"s{(ordinal // 4) % STEPS_PER_EXECUTION}"
    phase = ordinal % 4
    if phase == 0:
        return "step.enter", step, 1, {}
    if phase == 1:
        return "command.issued", step, 1, {"pool": "default", "command": f"c{ordinal}"}
    if phase == 2:
        return "user.progress", step, None, {"pct": 50, "note": "half way"}
    return "step.exit", step, 1, {"result": {"rows": ordinal, "ok": True}}


class EventFactory:
    """Fresh envelopes: new execution ids for every round, new event ids for every event."""

    def __init__(self, shard_count: int) -> None:
        self.projects = _projects(shard_count)
        # Execution ids are decimal int64 strings; start from the clock so reruns never collide.
        self._exec_ids = itertools.count(time.time_ns() // 1000)

    def round(self, n: int, executions: int) -> list[Envelope]:
        """``n`` events over ``executions`` fresh executions, interleaved (event j belongs to execution j % E)."""
        execs = [(str(next(self._exec_ids)), self.projects[i % len(self.projects)]) for i in range(executions)]
        out: list[Envelope] = []
        for j in range(n):
            execution_id, project = execs[j % executions]
            kind, step, attempt, payload = event_shape(j // executions)
            out.append(
                new_event(
                    tenant=TENANT,
                    project=project,
                    execution_id=execution_id,
                    type=kind,
                    step=step,
                    attempt=attempt,
                    payload=payload,
                )
            )
        return out


@dataclass
class Expected:
    """What the WAL holds after one round's publish: per shard counts, per execution last seq and count."""

    per_shard: dict[int, int] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    shard_of: dict[str, int] = field(default_factory=dict)


def expected_from(acks: Sequence[object], shard_count: int) -> Expected:
    exp = Expected(per_shard={s: 0 for s in range(shard_count)})
    for ack in acks:
        if not isinstance(ack, Ack) or ack.duplicate:
            raise RuntimeError(f"publish: not a fresh Ack: {ack!r}")
        shard = int(ack.stream.rsplit("_", 1)[1])
        exp.per_shard[shard] += 1
        x = ack.execution_id
        exp.shard_of[x] = shard
        exp.count[x] = exp.count.get(x, 0) + 1
        exp.last_seq[x] = max(exp.last_seq.get(x, 0), ack.seq)
    return exp


# --------------------------------------------------------------------------- phases


def round_timeout(events: int) -> float:
    """Give up on a phase after this many seconds (far beyond any normal run: ~1,000 events/s)."""
    return 30.0 + events / 1000


def _consumer_config(shard: int, durable: str, max_batch: int) -> ConsumerConfig:
    # The same consumer as kernel.pump.Pump._subscribe creates.
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.ALL,
        ack_wait=60.0,
        max_ack_pending=max_batch,
        max_deliver=-1,
        filter_subject=wal_subjects(shard),
    )


async def raw_pull(js: JetStreamContext, exp: Expected, prefix: str, batch: int) -> Timing:
    """Raw fetch + AckAll of every shard's messages, shards concurrently."""

    async def one(shard: int) -> float:
        durable = f"{prefix}_{shard}"
        sub = await js.pull_subscribe(
            wal_subjects(shard), durable=durable, stream=wal_stream(shard), config=_consumer_config(shard, durable, batch)
        )
        got, want = 0, exp.per_shard[shard]
        deadline = time.monotonic() + round_timeout(want)
        while got < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline: shard {shard} got {got} of {want} messages in {round_timeout(want):.0f}s")
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue
            got += len(msgs)
            await msgs[-1].ack_sync()
        done = time.perf_counter()
        await sub.unsubscribe()
        if got != want:
            raise RuntimeError(f"baseline: shard {shard} delivered {got} messages, {want} expected")
        return done

    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    ends = await asyncio.gather(*(one(s) for s in exp.per_shard))
    timing = Timing(max(ends) - t0, time.process_time() - c0)
    await _check_consumers(js, prefix, exp)
    return timing


class Timing(NamedTuple):
    """Wall seconds of a phase, and this process's CPU seconds over the same window."""

    wall: float
    cpu: float


@dataclass
class KernelParts:
    manifest: Manifest
    plugin: Plugin
    caches: dict[int, KvProjectionCache]
    snapshots: SnapshotStore
    shard_count: int


async def kernel_fold(js: JetStreamContext, parts: KernelParts, exp: Expected, tag: str) -> Timing:
    """Pumps + ``system/project`` on every shard until all events are folded and acked."""
    manifest = parts.manifest
    consumer = f"{manifest.consumer}_{tag}"
    pumps = [
        Pump(
            js,
            shard=shard,
            shard_count=parts.shard_count,
            plugin=parts.plugin,
            ctx=context_for(manifest, shard, cache=parts.caches[shard], snapshots=parts.snapshots),
            consumer=consumer,
            max_batch=manifest.max_batch,
            linger=manifest.linger_s,
        )
        for shard in exp.per_shard
    ]
    want = sum(exp.per_shard.values())
    deadline = time.monotonic() + round_timeout(want)
    stop = asyncio.Event()
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(p.run(stop), name=f"bench-pump-{p.shard}") for p in pumps]
    try:
        while sum(p.stats.events for p in pumps) < want:
            if any(t.done() for t in tasks):
                raise RuntimeError("a pump stopped before folding every event")
            if any(p.stats.failures or p.stats.dlq for p in pumps):
                raise RuntimeError(f"kernel: a batch failed or was dead-lettered (see the log): {[p.stats for p in pumps]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kernel: not done after {round_timeout(want):.0f}s: {[p.stats for p in pumps]}")
            await asyncio.sleep(0.001)
        timing = Timing(time.perf_counter() - t0, time.process_time() - c0)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for p in pumps:
        s = p.stats
        if s.events != exp.per_shard[p.shard] or s.failures or s.dlq:
            raise RuntimeError(f"kernel: shard {p.shard} stats {s} (expected {exp.per_shard[p.shard]} events)")
    await _check_consumers(js, consumer, exp)
    await _check_kv(parts, exp)
    return timing


async def _check_consumers(js: JetStreamContext, prefix: str, exp: Expected) -> None:
    """Every consumer of the round is drained (nothing pending, nothing unacked); then it is deleted."""
    for shard in exp.per_shard:
        durable = f"{prefix}_{shard}"
        info = await js.consumer_info(wal_stream(shard), durable)
        for _ in range(50):  # the pump's last ack is sent, not waited for: give it time to land
            if info.num_pending != 0 or info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
            info = await js.consumer_info(wal_stream(shard), durable)
        if info.num_pending != 0 or info.num_ack_pending != 0:
            raise RuntimeError(
                f"{durable}: num_pending={info.num_pending} num_ack_pending={info.num_ack_pending} after the round"
            )
        await js.delete_consumer(wal_stream(shard), durable)


async def _check_kv(parts: KernelParts, exp: Expected) -> None:
    bad: list[str] = []
    for execution_id, last_seq in exp.last_seq.items():
        entry = await parts.caches[exp.shard_of[execution_id]].get(execution_id)
        p = None if entry is None else entry.projection
        if p is None or p.last_seq != last_seq or p.event_count != exp.count[execution_id]:
            seen = None if p is None else (p.last_seq, p.event_count)
            bad.append(f"{execution_id}: (last_seq, event_count) {seen}, expected {(last_seq, exp.count[execution_id])}")
    if bad:
        raise RuntimeError(f"kernel: {len(bad)} of {len(exp.last_seq)} KV entries are wrong, first: {bad[0]}")


# --------------------------------------------------------------------------- rounds


def _stats(rates: Sequence[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(rates)),
        "best": round(max(rates)),
        "rounds": [round(r) for r in rates],
    }


async def stream_totals(js: JetStreamContext, shard_count: int) -> int:
    total = 0
    for shard in range(shard_count):
        total += (await js.stream_info(wal_stream(shard))).state.messages
    return total


async def run(url: str, topology: Topology, args: argparse.Namespace) -> dict[str, Any]:
    nc: NATS = await connect([url], name="bench-fold")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        shards = topology.shard_count
        producer = Producer(js, topology)
        factory = EventFactory(shards)
        manifest = system_manifests([PLUGIN])[0]
        parts = KernelParts(
            manifest=manifest,
            plugin=load_plugin(manifest),
            caches={s: await KvProjectionCache.open(js, s) for s in range(shards)},
            snapshots=SnapshotStore(f"file://{args.data_dir}/objects"),
            shard_count=shards,
        )
        raw: list[Timing] = []
        kernel: list[Timing] = []
        n = args.events
        load_before = os.getloadavg()[0]
        log(
            f"{args.warmup} warm-up + {args.rounds} rounds of {n:,} events over {args.executions} executions "
            f"on {shards} shards (baseline, then kernel, on the same messages)"
        )
        for r in range(args.warmup + args.rounds):
            for s in range(shards):
                await js.purge_stream(wal_stream(s))
            envs = factory.round(n, args.executions)
            exp = expected_from(await producer.publish_many(envs), shards)
            stored = await stream_totals(js, shards)
            if stored != n:
                raise RuntimeError(f"round {r}: {n} events published but the WAL streams hold {stored}")
            raw_t = await raw_pull(js, exp, f"raw_r{r}", manifest.max_batch)
            kernel_t = await kernel_fold(js, parts, exp, f"r{r}")
            raw_rate, kernel_rate = n / raw_t.wall, n / kernel_t.wall
            label = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.rounds}"
            log(
                f"{label}: raw pull+ack {raw_rate:,.0f} ev/s, kernel fold {kernel_rate:,.0f} ev/s "
                f"({kernel_rate / raw_rate:.2f}); CPU {raw_t.cpu * 1e6 / n:.1f} vs {kernel_t.cpu * 1e6 / n:.1f} us/event"
            )
            if r >= args.warmup:
                raw.append(raw_t)
                kernel.append(kernel_t)
    finally:
        await nc.close()

    raw_rates = [n / t.wall for t in raw]
    kernel_rates = [n / t.wall for t in kernel]
    raw_cpu = statistics.median(t.cpu * 1e6 / n for t in raw)
    kernel_cpu = statistics.median(t.cpu * 1e6 / n for t in kernel)

    out: dict[str, Any] = {
        "bench": "fold",
        "events": n,
        "executions": args.executions,
        "events_per_execution": n // args.executions,
        "shards": shards,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "max_batch": manifest.max_batch,
        "raw_ack": ACK_MODE,
        "raw_pull_ack_eps": _stats(raw_rates),
        "kernel_fold_eps": _stats(kernel_rates),
        "ratio_median": round(statistics.median(kernel_rates) / statistics.median(raw_rates), 3),
        "ratio_best": round(max(kernel_rates) / max(raw_rates), 3),
        # Per-round kernel/baseline (each pair runs back to back on the same messages): steadier on a busy host.
        "ratio_paired_median": round(statistics.median(k / b for k, b in zip(kernel_rates, raw_rates)), 3),
        "goal_ratio": GOAL_RATIO,
        # This process's CPU per event over each timed window (the client side is CPU-bound).
        "raw_cpu_us_per_event": round(raw_cpu, 1),
        "kernel_cpu_us_per_event": round(kernel_cpu, 1),
        "ratio_cpu": round(raw_cpu / kernel_cpu, 3),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out["meets_goal_ratio"] = out["ratio_median"] >= GOAL_RATIO
    return out


# --------------------------------------------------------------------------- pure fold


def pure_events(n: int, executions: int, *, block: int | None = None) -> list[WalEvent]:
    """``n`` WalEvents, seqs 1..n, built directly (not validated).

    The events come in blocks of ``block`` events (default: all ``n``), each over
    ``executions`` fresh executions, interleaved inside the block (event j of a
    block belongs to execution j % executions), like one shard's WAL in a round.
    """
    ts = now_ts()
    block = block or n
    out: list[WalEvent] = []
    for start in range(0, n, block):
        ids = [str(1_000_000 + start + i) for i in range(executions)]
        for j in range(min(block, n - start)):
            kind, step, attempt, payload = event_shape(j // executions)
            env = Envelope(
                v=ENVELOPE_VERSION,
                event_id=f"e{start + j}",
                execution_id=ids[j % executions],
                tenant=TENANT,
                project="p0",
                type=kind,
                ts=ts,
                step=step,
                attempt=attempt,
                payload=payload,
            )
            out.append(WalEvent(start + j + 1, env))
    return out


def fold_grouped(events: Sequence[WalEvent]) -> int:
    """Group per execution (as system/project does) and fold each group from nothing; returns executions."""
    by_execution: dict[str, list[WalEvent]] = {}
    for event in events:
        by_execution.setdefault(event.env.execution_id, []).append(event)
    for evs in by_execution.values():
        fold(None, evs)
    return len(by_execution)


def fold_single(events: Sequence[WalEvent]) -> int:
    fold(None, events)
    return 1


def plugin_cpu(events: Sequence[WalEvent], batch: int) -> int:
    """The plug-in's per-batch CPU without NATS: decode the KV value, fold onto it, encode it again."""
    kv: dict[str, bytes] = {}
    for start in range(0, len(events), batch):
        by_execution: dict[str, list[WalEvent]] = {}
        for event in events[start : start + batch]:
            by_execution.setdefault(event.env.execution_id, []).append(event)
        for execution_id, evs in by_execution.items():
            data = kv.get(execution_id)
            base: Projection | None = None if data is None else decode_entry(data, 1).projection
            folded = fold(base, evs)
            assert folded is not None
            kv[execution_id] = canonical(folded)
    return len(kv)


def time_pure(name: str, rounds: int, events: Sequence[WalEvent], fn: Callable[[Sequence[WalEvent]], int]) -> dict[str, Any]:
    rates: list[float] = []
    for r in range(rounds + 1):  # the first is a warm-up
        gc.collect()
        t0 = time.perf_counter()
        fn(events)
        rate = len(events) / (time.perf_counter() - t0)
        if r:
            rates.append(rate)
    stats = _stats(rates)
    log(f"pure fold {name}: median {stats['median']:,} ev/s, best {stats['best']:,} ev/s")
    return stats


def pure_fold(args: argparse.Namespace, batch: int, shards: int) -> dict[str, Any]:
    per_execution = max(1, args.events // args.executions)
    executions = max(1, args.pure_events // per_execution)
    grouped = pure_events(args.pure_events, executions)
    single = pure_events(args.pure_events, 1)
    # One shard's view of a kernel round, repeated: blocks of events/shards events over executions/shards executions.
    shard_execs = max(1, args.executions // shards)
    shard_like = pure_events(args.pure_events, shard_execs, block=shard_execs * per_execution)
    return {
        "events": args.pure_events,
        "grouped_executions": executions,
        "grouped": time_pure("grouped", args.rounds, grouped, fold_grouped),
        "single_execution": time_pure("single execution", args.rounds, single, fold_single),
        "plugin_cpu": time_pure(
            f"plug-in CPU path (batches of {batch}, {shard_execs} executions per batch)",
            args.rounds,
            shard_like,
            lambda evs: plugin_cpu(evs, batch),
        ),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the kernel's fold (pump + system/project plug-in, publish to folded-in-KV) against "
        "a raw nats-py pull+ack loop on the same messages in the same run, and the pure fold function. "
        "Prints one JSON object.",
    )
    p.add_argument("--events", type=int, default=20_000, help="events per round (default 20000)")
    p.add_argument(
        "--executions", type=int, default=200, help="executions per round, spread over all shards (default 200)"
    )
    p.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds first (default 1)")
    p.add_argument(
        "--pure-events",
        type=int,
        default=200_000,
        help="events of the pure fold measurement; 0 skips it (default 200000)",
    )
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of the default asyncio loop")
    p.add_argument("--log-level", default="warning", help="kernel log level on stderr (default warning)")
    args = p.parse_args(argv)
    if args.events < 1 or args.executions < 1 or args.rounds < 1 or args.warmup < 0 or args.pure_events < 0:
        p.error("--events, --executions and --rounds must be >= 1, --warmup and --pure-events >= 0")
    if args.executions > args.events:
        p.error("--executions must not exceed --events")
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
    with tempfile.TemporaryDirectory(prefix="noetl-bench-fold-") as data_dir:
        args.data_dir = data_dir
        with EmbeddedServer(data_dir=data_dir, topology=topology, port=0) as server:
            log(f"nats-server at {server.url} (data in {data_dir})")
            result = asyncio.run(run(server.url, topology, args))
    manifest = system_manifests([PLUGIN])[0]
    if args.pure_events:
        result["pure_fold_eps"] = pure_fold(args, manifest.max_batch, topology.shard_count)
        result["goal_pure_fold_eps"] = GOAL_PURE_FOLD_EPS
        result["meets_goal_pure_fold"] = result["pure_fold_eps"]["grouped"]["median"] >= GOAL_PURE_FOLD_EPS
    result["loop"] = loop_name
    result["nats_server"] = nats_server_version()
    result["nats_py"] = dist_version("nats-py")
    result["python"] = platform.python_version()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
