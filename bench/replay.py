#!/usr/bin/env python
"""Replay benchmark: read + decode + fold one execution's history against a raw ordered-consumer read, in one run.

What is measured
----------------
One ``nats-server`` (``natscluster.server.EmbeddedServer``, JetStream on a temporary
directory) is started and bootstrapped with the default topology (4 shards).
One execution of N events (default 50,000) is published once with
``Producer.publish_many``, *not timed*: ``execution.requested``, then per step
``step.enter``, ``command.issued``, ``command.claimed``, ``user.progress`` and
``step.exit`` (a small result), and ``execution.completed`` last. Other
executions of the same project write on the same shard, interleaved (10 % of
the shard's messages by default, ``--other``), so the execution's subject
filter has to skip them. The WAL must hold exactly what was acked.

Then a warm-up round (not counted) and R rounds, each running, on the same
messages and in an order that alternates from round to round:

* **baseline** — raw nats-py: ``js.subscribe(<execution filter>, stream=WAL_<shard>,
  ordered_consumer=True, config=ConsumerConfig(deliver_policy=ALL))`` and a
  ``next_msg`` loop until the N messages are in, nothing decoded; timed from
  the subscribe to the unsubscribe;
* **replay** — ``projector.replay.history(...)`` (the ordered consumer, every
  message decoded and validated by ``decode_wal_message``, poison skipped as
  the pump skips it, a progress hook) collected and folded with
  ``projector.fold.fold``. The fold's ``event_count`` and ``last_seq`` must be
  the published count and the execution's last acked sequence, and the
  progress hook must end at (N, N), or the run aborts;
* **timeline** (reported, not a goal) — the replay plus
  ``projector.timeline.timeline`` rows for every event (what
  ``noetl-edge replay`` prints);
* **cli** (reported, not a goal; only when ``edge/cli/replay.py`` exists) —
  the wall time of the ``noetl-edge replay <urn> --json`` subprocess, start-up
  included.

Rates are events of the execution per second. ``ratio`` is replay / baseline
on the medians (goal >= 0.5), ``ratio_paired_median`` the median of the
per-round ratios. This process's CPU time per event is reported for the
baseline and the replay, with the 1-minute load average before and after.

The single JSON result goes to stdout; progress goes to stderr. The server is
stopped on exit (also on errors).

Usage: ``python bench/replay.py [--quick] [--events N] [--rounds R] [--other FRACTION]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench.common import child_env, dist_version, nats_server_version
from kernel.bootstrap import bootstrap
from kernel.connect import close, connect
from kernel.logs import configure_logging
from kernel.producer import Ack, Producer
from natscluster.server import EmbeddedServer
from locator import default_topology
from locator.envelope import Envelope, new_event
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream
from locator.topology import Topology
from locator.urn import Urn
from projector.fold import fold
from projector.replay import history
from projector.timeline import timeline

GOAL_RATIO = 0.5
TENANT = "bench"
PROJECT = "replay"
STEPS = 25  # step names cycle over this many (a long history revisits its steps)
OTHER_EXECUTIONS = 20
PUBLISH_CHUNK = 10_000
IDLE_TIMEOUT = 10.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- events


def shape(ordinal: int, n: int) -> tuple[str, str | None, int | None, dict[str, Any]]:
    """(type, step, attempt, payload) of event ``ordinal`` of an ``n``-event history."""
    if ordinal == 0:
        return "execution.requested", None, None, {"playbook": {"path": "bench/replay", "version": 1},
                                                   "workload": {"rows": n, "region": "eu"}}  # fmt: skip
    if ordinal == n - 1:
        return "execution.completed", None, None, {}
    k = ordinal - 1
    step, phase = f"s{(k // 5) % STEPS}", k % 5
    if phase == 0:
        return "step.enter", step, 1, {"from": f"s{(k // 5 - 1) % STEPS}" if k else None}
    if phase == 1:
        return "command.issued", step, 1, {"kind": "python", "command_id": f"c{k // 5}", "pool": "default"}
    if phase == 2:
        return "command.claimed", step, 1, {"command_id": f"c{k // 5}", "worker": "w-1"}
    if phase == 3:
        return "user.progress", step, None, {"pct": 50, "note": "half way"}
    return "step.exit", step, 1, {"result": {"rows": k, "ok": True}}


class History(NamedTuple):
    """What was published: the execution, its event count and last sequence, and the shard's message count."""

    urn: Urn
    shard: int
    events: int
    last_seq: int
    stored: int


def envelopes(execution_id: str, n: int, other: float, first_other: int) -> tuple[list[Envelope], int]:
    """The execution's ``n`` events with other executions' events of the same project interleaved."""
    others = round(n * other / (1 - other)) if other else 0
    out: list[Envelope] = []
    every = n / others if others else 0.0
    o = 0
    for i in range(n):
        kind, step, attempt, payload = shape(i, n)
        out.append(new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type=kind, step=step,
                             attempt=attempt, payload=payload))  # fmt: skip
        while o < others and (o + 1) * every <= i + 1:
            x = str(first_other + o % OTHER_EXECUTIONS)
            kind, step, attempt, payload = shape(1 + o // OTHER_EXECUTIONS, 10**9)
            out.append(new_event(tenant=TENANT, project=PROJECT, execution_id=x, type=kind, step=step,
                                 attempt=attempt, payload=payload))  # fmt: skip
            o += 1
    return out, others


async def publish(js: JetStreamContext, topology: Topology, n: int, other: float) -> History:
    base = time.time_ns() // 1000
    execution_id = str(base)
    envs, others = envelopes(execution_id, n, other, base + 1)
    producer = Producer(js, topology)
    last_seq = count = 0
    for start in range(0, len(envs), PUBLISH_CHUNK):
        for ack in await producer.publish_many(envs[start : start + PUBLISH_CHUNK]):
            if not isinstance(ack, Ack) or ack.duplicate:
                raise RuntimeError(f"publish: not a fresh Ack: {ack!r}")
            if ack.execution_id == execution_id:
                count, last_seq = count + 1, max(last_seq, ack.seq)
    shard = shard_for(TENANT, PROJECT, "", topology.shard_count)
    stored = (await js.stream_info(wal_stream(shard))).state.messages
    if count != n or stored != n + others:
        raise RuntimeError(f"published {n} + {others} events, {count} acked for the execution, the WAL holds {stored}")
    return History(Urn(TENANT, PROJECT, execution_id), shard, n, last_seq, stored)


# --------------------------------------------------------------------------- phases


async def raw_read(js: JetStreamContext, h: History) -> None:
    """The baseline: an ordered consumer on the execution's filter, ``next_msg`` until all N are in."""
    subject = execution_filter(h.shard, h.urn.tenant, h.urn.project, h.urn.execution_id)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await js.subscribe(subject, stream=wal_stream(h.shard), ordered_consumer=True, config=config)
    try:
        for _ in range(h.events):
            msg = await sub.next_msg(timeout=IDLE_TIMEOUT)
        if msg.metadata.sequence.stream != h.last_seq:
            raise RuntimeError(f"raw read ended at seq {msg.metadata.sequence.stream}, expected {h.last_seq}")
    finally:
        await sub.unsubscribe()


async def replay_fold(js: JetStreamContext, h: History, topology: Topology, *, rows: bool = False) -> None:
    """``history`` + ``fold`` (+ timeline rows); aborts unless every published event was folded."""
    seen: list[tuple[int, int]] = []
    events = [
        e
        async for e in history(
            js, shard=h.shard, shard_count=topology.shard_count, tenant=h.urn.tenant, project=h.urn.project,
            execution_id=h.urn.execution_id, limit=h.events, idle_timeout=IDLE_TIMEOUT,
            progress=lambda read, total: seen.append((read, total)),
        )
    ]  # fmt: skip
    p = fold(None, events)
    if p is None or p.event_count != h.events or p.last_seq != h.last_seq or p.status != "COMPLETED":
        got = None if p is None else (p.event_count, p.last_seq, p.status)
        raise RuntimeError(f"replay folded (event_count, last_seq, status) {got}, expected {(h.events, h.last_seq)}")
    if not seen or seen[-1] != (h.events, h.events):
        raise RuntimeError(f"the progress hook ended at {seen[-1:]}, expected {(h.events, h.events)}")
    if rows and sum(1 for _ in timeline(events)) != h.events:
        raise RuntimeError("timeline rows and events differ in number")


def cli_available() -> bool:
    return importlib.util.find_spec("edge.cli.replay") is not None


def cli_replay(url: str, h: History, topology: Topology) -> None:
    """``noetl-edge replay <urn> --json`` in a subprocess; its JSON rows must be every event."""
    exe = Path(sys.executable).parent / "noetl-edge"
    env = {**child_env(), "NOETL_SHARDS": str(topology.shard_count)}
    proc = subprocess.run([str(exe), "replay", str(h.urn), "--json", "--nats-url", url, "--log-level", "warning"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"noetl-edge replay exited {proc.returncode}: {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)["rows"]
    if len(rows) != h.events or rows[-1]["seq"] != h.last_seq:
        raise RuntimeError(f"noetl-edge replay --json listed {len(rows)} rows, expected {h.events} up to seq {h.last_seq}")


class Timing(NamedTuple):
    wall: float
    cpu: float


async def timed(fn: Callable[[], Awaitable[None]]) -> Timing:
    w0, c0 = time.perf_counter(), time.process_time()
    await fn()
    return Timing(time.perf_counter() - w0, time.process_time() - c0)


# --------------------------------------------------------------------------- rounds


def _stats(rates: Sequence[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(rates)), "best": round(max(rates)), "rounds": [round(r) for r in rates]}


async def run(url: str, topology: Topology, args: argparse.Namespace) -> dict[str, Any]:
    nc = await connect([url], name="bench-replay")
    try:
        js = nc.jetstream()
        await bootstrap(js, topology)
        log(f"publishing {args.events:,} events of one execution, {args.other:.0%} other traffic on its shard")
        h = await publish(js, topology, args.events, args.other)
        phases: dict[str, Callable[[], Awaitable[None]]] = {
            "baseline": lambda: raw_read(js, h),
            "replay": lambda: replay_fold(js, h, topology),
            "timeline": lambda: replay_fold(js, h, topology, rows=True),
        }
        with_cli = cli_available() and not args.no_cli
        if with_cli:
            phases["cli"] = lambda: asyncio.to_thread(cli_replay, url, h, topology)
        times: dict[str, list[Timing]] = {name: [] for name in phases}
        load_before = os.getloadavg()[0]
        for r in range(args.warmup + args.rounds):
            names = list(phases) if r % 2 == 0 else list(reversed(phases))
            got = {name: await timed(phases[name]) for name in names}
            label = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.rounds}"
            log(f"{label}: " + ", ".join(f"{k} {h.events / t.wall:,.0f} ev/s" for k, t in got.items()))
            if r >= args.warmup:
                for name, t in got.items():
                    times[name].append(t)
    finally:
        await close(nc)
    rates = {name: [h.events / t.wall for t in ts] for name, ts in times.items()}
    base = statistics.median(rates["baseline"])

    def ratio(name: str) -> float:
        return round(statistics.median(rates[name]) / base, 3)

    cpu = {name: round(statistics.median(t.cpu * 1e6 / h.events for t in times[name]), 1)
           for name in ("baseline", "replay", "timeline")}  # fmt: skip
    out: dict[str, Any] = {
        "bench": "replay",
        "events": h.events,
        "other_events_on_shard": h.stored - h.events,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "baseline_eps": _stats(rates["baseline"]),
        "replay_eps": _stats(rates["replay"]),
        "timeline_eps": _stats(rates["timeline"]),
        "cli_eps": _stats(rates["cli"]) if with_cli else None,
        "cli_skipped": None if with_cli else ("--no-cli" if args.no_cli else "edge/cli/replay.py does not exist"),
        "ratio": ratio("replay"),
        "ratio_paired_median": round(statistics.median(r / b for r, b in zip(rates["replay"], rates["baseline"])), 3),
        "ratio_timeline": ratio("timeline"),
        "ratio_cli": ratio("cli") if with_cli else None,
        "goal": GOAL_RATIO,
        "cpu_us_per_event": cpu,
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out["meets_goal"] = out["ratio"] >= GOAL_RATIO
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="events/s of replaying one execution from the WAL (decode + fold) "
                                "against a raw ordered-consumer read of the same subject, in one run; prints JSON")  # fmt: skip
    p.add_argument("--events", type=int, default=50_000, help="events of the replayed execution (default 50000)")
    p.add_argument("--other", type=float, default=0.1, help="fraction of the shard's messages from other executions (default 0.1)")
    p.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds first (default 1)")
    p.add_argument("--no-cli", action="store_true", help="skip the noetl-edge replay subprocess figure")
    p.add_argument("--quick", action="store_true", help="a smoke run (for tests): 2000 events, 1 warm-up, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.warmup = 2000, 1, 1
    if args.events < 2 or args.rounds < 1 or args.warmup < 0 or not 0 <= args.other < 1:
        p.error("--events must be >= 2, --rounds >= 1, --warmup >= 0 and 0 <= --other < 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="warning")
    topology = default_topology()
    with (
        tempfile.TemporaryDirectory(prefix="noetl-bench-replay-") as data_dir,
        EmbeddedServer(data_dir=data_dir, topology=topology, port=0) as server,
    ):
        log(f"nats-server at {server.url}")
        result = asyncio.run(run(server.url, topology, args))
    result["quick"] = args.quick
    result["versions"] = {"nats_server": nats_server_version(), "nats_py": dist_version("nats-py"),
                          "python": platform.python_version()}  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
