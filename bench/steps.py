#!/usr/bin/env python
"""Steps benchmark: how long one orchestrated step takes, end to end, against a raw NATS round trip, in one run.

What is measured
----------------
One ``nats-server`` (``natscluster.server.EmbeddedServer``, JetStream on a temporary
directory, free port) is started and bootstrapped (``kernel.bootstrap``, 4
shards by default). Then, as separate processes, exactly as an operator runs
them: one ``noetl-edge kernel`` (``system/project``, ``system/orchestrate``,
``system/materialize`` and the timer scheduler on every shard) and two
``noetl-edge worker`` processes (pool ``shared``, ``--concurrency`` each). Two
playbooks are registered in the catalog: ``bench/linear<N>`` (N ``noop`` steps
in a row, default 20) and ``bench/one`` (one ``noop`` step). Executions are
started the way ``noetl-edge run`` starts them: an ``execution.requested``
event published with ``kernel.producer.Producer``; this process learns of the
end from an ordered JetStream consumer per shard on
``wal.<shard>.bench.*.*.execution.*`` (so only what the WAL stored counts).

1. **floor** — raw nats-py request-reply: a responder process (this file with
   ``--serve-responder``) answers on a subject, and this process sends
   ``--floor-requests`` sequential requests (256-byte body) after a warm-up;
   p50/p99 in ms. Measured twice, right before and right after the latency
   phase, and pooled (the host may be busy; both halves are reported). For
   reference, the same loop against a responder on a second connection in
   this process, and the round trip of an acknowledged JetStream publish to a
   file-storage stream (every event and command on a step's path is one).
2. **latency** — ``--executions`` executions of the linear playbook, one at a
   time after ``--warmup`` uncounted ones: from just before the
   ``execution.requested`` publish to the moment the ``execution.completed``
   event is delivered from the WAL. Reported per execution and divided by N
   (per step); ``ratio_step_p50_to_rtt_p50`` = per-step p50 / floor p50.
3. **breakdown** — every measured execution's WAL is read back afterwards with
   the server's store timestamps (nanoseconds, one clock), and each step is
   cut into: the orchestrator's reaction (previous ``step.exit`` stored →
   ``step.enter`` stored: pump delivery, ack of the batch before, state, plan,
   publish), ``step.enter`` → ``command.issued``, dispatch (``command.issued``
   → ``command.claimed``: the command's publish to ``CMD_<shard>``, the
   worker's fetch, its ``command.claimed`` publish) and the run (``claimed`` →
   ``step.exit``: the noop and its result publish). It also checks that every
   step had exactly one ``command.issued``.
4. **throughput** — ``--burst`` executions of the one-step playbook published
   at once (``publish_many``), spread evenly over all shards, with the two
   workers; executions/s = burst / (last ``execution.completed`` delivered −
   first publish). ``--rounds`` bursts; median and all rounds reported.

Alongside: the CPU each process (kernel, workers, nats-server, this client)
spent per step over the latency phase and per execution over the bursts, and
the NATS messages the kernel and the workers sent and received per step
(nats-server's ``/connz``). On a host with few cores a step can be no faster
than the CPU it needs, and a busy host slows a pipeline of several processes
far more than one round trip: read the figures with ``loadavg_1m``.

By default the orchestrator runs the ``noop`` steps itself (inline steps,
``system_playbooks/orchestrate/inline.py``): a step's ``command.claimed`` and
``step.exit`` are published with its ``command.issued`` and no worker
takes part. ``--no-inline`` starts the kernel with
``NOETL_INLINE_STEPS=0``: every step crosses a worker, as before; the
settings say which (``inline_steps``).

With ``--profile`` the kernel and the workers run the same ``noetl-edge``
entry point through this file with timing hooks (``bench/steps_profile.py``),
and a ``profile`` section tells where a step goes inside them: the orchestrate
pump's wait, delivery, state and plan, one ``publish`` from the first send to
the last ack (split into queueing and waiting for acks; re-publishes after a
missing ack are counted), and the batch's ack; the worker's delivery, then
claim queued → run done → outcome acked → claim confirmed → command acked.
Each segment carries its description (``what``).

The machine (cores, CPU model, load average before and after), the versions
and every setting go into the JSON. The single JSON result goes to stdout;
progress goes to stderr. Every process is stopped on exit (also on errors and
Ctrl-C). A run with dead letters, a failed execution or a duplicate command
aborts instead of reporting.

Usage: ``python bench/steps.py [--quick] [--profile] [--executions N] [--steps S] [--burst B] [--rounds R]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import nats  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from bench.common import Proc, cpu_seconds, dist_version, nats_server_version  # noqa: E402
from edge.cli.options import stop_on_signals  # noqa: E402
from kernel.bootstrap import bootstrap  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.host import consumer_stream, system_manifests  # noqa: E402
from kernel.logs import configure_logging  # noqa: E402
from kernel.producer import Ack, Producer  # noqa: E402
from natscluster.server import EmbeddedServer  # noqa: E402
from locator import default_topology  # noqa: E402
from locator.envelope import Envelope, new_event  # noqa: E402
from locator.ids import Snowflake  # noqa: E402
from locator.shard import shard_for  # noqa: E402
from locator.subjects import CATALOG_BUCKET, cmd_stream, dlq_stream, execution_filter, wal_stream  # noqa: E402
from locator.topology import Topology  # noqa: E402
from system_playbooks.orchestrate.catalog import Catalog  # noqa: E402
from system_playbooks.orchestrate.playbook import Policy  # noqa: E402

from bench.steps_profile import ack_tokens, analyse, serve  # noqa: E402

GOAL_STEP_P50_MS = 5.0
TENANT = "bench"
POOL = "shared"
FLOOR_SUBJECT = "bench.floor.echo"
FLOOR_STREAM = "BENCH_FLOOR"
FLOOR_BODY = b"x" * 256
TERMINAL = ("execution.completed", "execution.failed", "execution.cancelled")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def progress(label: str, done: int, total: int) -> None:
    """A one-line counter on stderr, redrawn in place on a terminal, every tenth otherwise."""
    if sys.stderr.isatty():
        print(f"\r[bench] {label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        log(f"{label}: {done}/{total}")


# --------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the value below which ``q`` % of the samples lie)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def dist(samples_ms: Sequence[float]) -> dict[str, Any]:
    return {
        "p50": round(percentile(samples_ms, 50), 3),
        "p99": round(percentile(samples_ms, 99), 3),
        "mean": round(statistics.fmean(samples_ms), 3),
        "min": round(min(samples_ms), 3),
        "max": round(max(samples_ms), 3),
        "samples": len(samples_ms),
    }


# --------------------------------------------------------------------------- processes


def _cli() -> str:
    found = Path(sys.executable).parent / "noetl-edge"
    return str(found) if found.exists() else shutil.which("noetl-edge") or "noetl-edge"


@dataclass
class Parts:
    url: str
    nats_pid: int | None
    monitor: str
    kernel: Proc
    workers: list[Proc]
    responder: Proc
    fold_kernel: Proc | None = None  # with --split-kernels: the project+materialize kernel

    @property
    def kernels(self) -> list[Proc]:
        return [self.kernel] + ([self.fold_kernel] if self.fold_kernel else [])

    def check(self) -> None:
        for p in (*self.kernels, *self.workers, self.responder):
            p.check()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process that takes part in a step."""
        return {
            "kernel": sum(cpu_seconds(k.proc.pid) for k in self.kernels),
            "workers": sum(cpu_seconds(w.proc.pid) for w in self.workers),
            "nats_server": cpu_seconds(self.nats_pid),
            "client": time.process_time(),
        }


def connections(monitor: str) -> dict[str, tuple[int, int]]:
    """Messages (sent by, delivered to) each client so far, by role (kernel, workers), from nats-server's /connz."""
    with urllib.request.urlopen(f"{monitor}/connz?limit=1000", timeout=10) as response:
        conns = json.load(response)["connections"]
    out: dict[str, tuple[int, int]] = {}
    for c in conns:
        name = c.get("name", "")
        role = "kernel" if name.startswith("noetl-kernel") else "workers" if name.startswith("noetl-worker") else None
        if role:
            sent, received = out.get(role, (0, 0))
            out[role] = (sent + c["in_msgs"], received + c["out_msgs"])
    return out


def msgs_per(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], units: int) -> dict[str, Any]:
    return {
        role: {"sent": round((after[role][0] - before[role][0]) / units, 2),
               "received": round((after[role][1] - before[role][1]) / units, 2)}  # fmt: skip
        for role in sorted(after)
        if role in before
    }


def cpu_per(before: dict[str, float], after: dict[str, float], units: int) -> dict[str, float]:
    """CPU milliseconds per unit of work, per process, over a phase."""
    out = {k: round((after[k] - before[k]) * 1000 / units, 3) for k in before}
    out["total"] = round(sum(out.values()), 3)
    return out


@contextlib.contextmanager
def processes(server: EmbeddedServer, work: Path, args: argparse.Namespace) -> Iterator[Parts]:
    """The kernel, the two workers and the floor's responder, each its own process."""
    started: list[Proc] = []
    url = server.url
    common = ["--nats-url", url, "--shards", str(args.shards), "--log-level", args.log_level]
    data = str(work / "data")
    this = str(Path(__file__).resolve())

    def command(name: str, role: str, argv: list[str]) -> list[str]:
        if not args.profile:
            return [_cli(), *argv]
        # The same `noetl-edge` entry point, run by this file with timing hooks (bench/steps_profile.py).
        return [sys.executable, this, "--serve", role, str(work / f"{name}.profile.json"), "--", *argv]

    # The orchestrator runs noop steps itself unless told not to (NOETL_INLINE_STEPS, read by the kernel).
    kernel_env = {"NOETL_INLINE_STEPS": "0" if args.no_inline else "1"}
    try:
        responder = Proc("responder", [sys.executable, this, "--serve-responder", url], work)
        started.append(responder)
        split = ["--plugins", "orchestrate"] if args.split_kernels else []
        kernel = Proc("kernel", command("kernel", "kernel", ["kernel", "--data-dir", data, *split, *common]), work,
                      env=kernel_env)
        started.append(kernel)
        fold_kernel = None
        if args.split_kernels:
            argv = ["kernel", "--data-dir", data, "--plugins", "project,materialize", *common]
            fold_kernel = Proc("kernel-fold", command("kernel-fold", "kernel", argv), work, env=kernel_env)
            started.append(fold_kernel)
        workers = []
        for i in range(args.workers):
            argv = ["worker", "--pool", POOL, "--concurrency", str(args.concurrency), "--data-dir", data, *common]
            w = Proc(f"worker{i}", command(f"worker{i}", "worker", argv), work)
            started.append(w)
            workers.append(w)
        for p in (responder, kernel, *([fold_kernel] if fold_kernel else [])):
            if not p.line().startswith("ready"):
                raise RuntimeError(f"{p.name}: no ready line; stderr:\n{p.tail()}")
        nats_pid = server.process.pid if server.process else None
        yield Parts(url, nats_pid, f"http://{server.host}:{server.monitor_port}", kernel, workers, responder, fold_kernel)
    finally:
        for p in reversed(started):
            p.stop()


def serve_responder(url: str) -> int:
    """The floor's other side: answer every request on ``FLOOR_SUBJECT`` with its own body."""

    async def main() -> None:
        stop = stop_on_signals()
        nc = await nats.connect(url, name="bench-responder")

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(FLOOR_SUBJECT, cb=echo)
        await nc.flush()
        print("ready responder", flush=True)
        await stop.wait()
        await nc.close()

    asyncio.run(main())
    return 0


async def wait_ready(js: JetStreamContext, parts: Parts, shards: int, timeout: float = 60.0) -> None:
    """Until the kernel's pumps have their consumers and every worker is pulling on every shard."""
    deadline = time.monotonic() + timeout
    consumers = [m.consumer for m in system_manifests()]
    while True:
        parts.check()
        missing: list[str] = []
        for shard in range(shards):
            for consumer in consumers:
                try:
                    await js.consumer_info(consumer_stream(consumer, shard), f"{consumer}_{shard}")
                except NotFoundError:
                    missing.append(f"{consumer}_{shard}")
            try:
                info = await js.consumer_info(cmd_stream(shard), f"workers_{POOL}")
            except NotFoundError:
                missing.append(f"workers_{POOL} on {cmd_stream(shard)}")
            else:
                # Each idle worker keeps one pull request waiting per shard.
                if (info.num_waiting or 0) < len(parts.workers):
                    missing.append(f"{len(parts.workers)} pulls on {cmd_stream(shard)} (has {info.num_waiting})")
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {missing[:4]}")
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- playbooks and executions


def linear_playbook(path: str, steps: int) -> dict[str, Any]:
    names = [f"s{i:02d}" for i in range(steps)]
    return {
        "path": path,
        "version": 1,
        "steps": [
            {"name": name, "tool": {"kind": "noop"}, **({"next": [{"step": names[i + 1]}]} if i + 1 < steps else {})}
            for i, name in enumerate(names)
        ],
    }


def projects_per_shard(shards: int) -> list[str]:
    """One project name per shard, index = shard (``shard_for(TENANT, name) == index``)."""
    found: dict[int, str] = {}
    for i in itertools.count():
        name = f"p{i}"
        found.setdefault(shard_for(TENANT, name, "", shards), name)
        if len(found) == shards:
            return [found[s] for s in range(shards)]
    raise AssertionError("unreachable")


class Ends:
    """Futures resolved when an execution's terminal event is delivered from the WAL (one ordered consumer per shard)."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.subs: list[Any] = []

    async def start(self, js: JetStreamContext, shards: int) -> None:
        async def on_msg(msg: Msg) -> None:
            tokens = msg.subject.split(".", 5)
            kind = tokens[5]
            if kind in TERMINAL:
                fut = self.waiting.pop(tokens[4], None)
                if fut is not None and not fut.done():
                    fut.set_result((time.perf_counter(), kind))

        for shard in range(shards):
            self.subs.append(
                await js.subscribe(
                    f"wal.{shard}.{TENANT}.*.*.execution.*",
                    stream=wal_stream(shard),
                    ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                    cb=on_msg,
                )
            )

    def expect(self, execution_id: str) -> asyncio.Future[tuple[float, str]]:
        fut: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self.waiting[execution_id] = fut
        return fut

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Starter:
    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        self.producer = Producer(js, topology)
        self.ids = Snowflake()

    def request(self, project: str, path: str) -> Envelope:
        execution_id = self.ids.next_str()
        return new_event(
            tenant=TENANT, project=project, execution_id=execution_id, type="execution.requested",
            event_id=f"{execution_id}:requested", payload={"playbook": {"path": path, "version": 1}, "workload": {}},
        )  # fmt: skip


async def finished(fut: asyncio.Future[tuple[float, str]], execution_id: str, timeout: float, parts: Parts) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            t, kind = await asyncio.wait_for(asyncio.shield(fut), 1.0)
        except asyncio.TimeoutError:
            parts.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"execution {execution_id} did not end within {timeout:.0f}s") from None
            continue
        if kind != "execution.completed":
            raise RuntimeError(f"execution {execution_id} ended with {kind}, not execution.completed")
        return t


# --------------------------------------------------------------------------- phases


async def floor(nc: NATS, js: JetStreamContext, url: str, n: int, warmup: int) -> dict[str, list[float]]:
    """Sequential round trips in ms: to the responder process, to an in-process responder, a JetStream publish ack."""
    out: dict[str, list[float]] = {"request_reply": [], "request_reply_in_process": [], "js_publish_ack": []}
    local = await nats.connect(url, name="bench-local-responder")
    try:

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await local.subscribe("bench.floor.local", cb=echo)
        await local.flush()
        targets: dict[str, Callable[[], Awaitable[object]]] = {
            "request_reply": lambda: nc.request(FLOOR_SUBJECT, FLOOR_BODY, timeout=5.0),
            "request_reply_in_process": lambda: nc.request("bench.floor.local", FLOOR_BODY, timeout=5.0),
            "js_publish_ack": lambda: js.publish("benchfloor.x", FLOOR_BODY, timeout=5.0),
        }
        for name, call in targets.items():
            for i in range(warmup + n):
                t0 = time.perf_counter()
                await call()
                if i >= warmup:
                    out[name].append((time.perf_counter() - t0) * 1000)
    finally:
        await local.close()
    return out


async def latency(
    starter: Starter, ends: Ends, parts: Parts, project: str, path: str, count: int, steps: int, *, label: str
) -> tuple[list[float], list[str]]:
    """``count`` executions of the linear playbook, one at a time: their times (ms) and ids."""
    times: list[float] = []
    ids: list[str] = []
    for i in range(count):
        env = starter.request(project, path)
        fut = ends.expect(env.execution_id)
        t0 = time.perf_counter()
        await starter.producer.publish(env)
        t1 = await finished(fut, env.execution_id, 30.0 + steps, parts)
        times.append((t1 - t0) * 1000)
        ids.append(env.execution_id)
        progress(label, i + 1, count)
    return times, ids


async def burst(starter: Starter, ends: Ends, parts: Parts, projects: Sequence[str], n: int) -> tuple[float, list[float]]:
    """``n`` one-step executions published at once over all shards; (executions/s, per-execution latency ms)."""
    envs = [starter.request(projects[i % len(projects)], "bench/one") for i in range(n)]
    futs = {env.execution_id: ends.expect(env.execution_id) for env in envs}
    t0 = time.perf_counter()
    acks = await starter.producer.publish_many(envs)
    bad = [a for a in acks if not isinstance(a, Ack) or a.duplicate]
    if bad:
        raise RuntimeError(f"burst: {len(bad)} requests not stored, first: {bad[0]}")
    deadline = time.monotonic() + 60.0 + n / 10
    pending = set(futs.values())
    while pending:
        done, pending = await asyncio.wait(pending, timeout=1.0)
        parts.check()
        progress("burst executions", n - len(pending), n)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"burst: {len(pending)} of {n} executions not done in time")
    ends_at = []
    for execution_id, fut in futs.items():
        t, kind = fut.result()
        if kind != "execution.completed":
            raise RuntimeError(f"burst: execution {execution_id} ended with {kind}")
        ends_at.append(t)
    return n / (max(ends_at) - t0), [(t - t0) * 1000 for t in ends_at]


History = list[tuple[int, int, str, str | None]]


async def wal_history(js: JetStreamContext, shard: int, project: str, execution_id: str) -> History:
    """(stream seq, store ns, type, step) of every event of the execution, in WAL order."""
    subject = execution_filter(shard, TENANT, project, execution_id)
    sub = await js.subscribe(subject, stream=wal_stream(shard), ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))  # fmt: skip
    out: History = []
    try:
        while True:
            msg = await sub.next_msg(timeout=10.0)
            env = json.loads(msg.data)
            seq, stored = ack_tokens(msg.reply)
            out.append((seq, stored, env["type"], env.get("step")))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


SEGMENTS = {
    "orchestrate": "previous step.exit stored -> step.enter stored (pump delivery, ack of the batch before, "
    "state, plan, publish)",
    "enter_to_issued": "step.enter -> command.issued (same publish_many)",
    "dispatch": "command.issued -> command.claimed (command publish to CMD, worker fetch, claimed publish; a step "
    "run inline: the same publish_many)",
    "run": "command.claimed -> step.exit (noop run, result publish; inline: the same publish_many)",
}


def breakdown(histories: Sequence[History], steps: int) -> dict[str, Any]:
    """Cut every step of every execution into the segments of ``SEGMENTS`` (store timestamps, ms)."""
    names = [f"s{i:02d}" for i in range(steps)]
    seg: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    cycle: list[float] = []
    start: list[float] = []
    finish: list[float] = []
    span: list[float] = []
    events: list[int] = []
    duplicates = 0
    for history in histories:
        first: dict[tuple[str, str | None], int] = {}
        for _seq, ns, kind, step in history:
            if kind == "command.issued" and (kind, step) in first:
                duplicates += 1
            first.setdefault((kind, step), ns)

        def at(kind: str, step: str | None = None) -> int:
            try:
                return first[(kind, step)]
            except KeyError:
                raise RuntimeError(f"breakdown: no {kind} for step {step} in an execution's WAL") from None

        events.append(len(history))
        requested, completed = at("execution.requested"), at("execution.completed")
        span.append((completed - requested) / 1e6)
        start.append((at("step.enter", names[0]) - requested) / 1e6)
        finish.append((completed - at("step.exit", names[-1])) / 1e6)
        for i, name in enumerate(names):
            enter, issued = at("step.enter", name), at("command.issued", name)
            claimed, exit_ = at("command.claimed", name), at("step.exit", name)
            if i:
                before = at("step.exit", names[i - 1])
                seg["orchestrate"].append((enter - before) / 1e6)
                cycle.append((exit_ - before) / 1e6)
            seg["enter_to_issued"].append((issued - enter) / 1e6)
            seg["dispatch"].append((claimed - issued) / 1e6)
            seg["run"].append((exit_ - claimed) / 1e6)
    mean_cycle = statistics.fmean(cycle) if cycle else float("nan")
    return {
        "segments_ms": {
            k: dist(v) | {"share_of_mean_step": round(statistics.fmean(v) / mean_cycle, 3), "what": SEGMENTS[k]}
            for k, v in seg.items()
            if v
        },
        "step_cycle_ms": dist(cycle) if cycle else None,
        "start_ms": dist(start) | {"what": "execution.requested -> first step.enter (incl. execution.started)"},
        "finish_ms": dist(finish) | {"what": "last step.exit -> execution.completed"},
        "wal_span_ms": dist(span) | {"what": "execution.requested stored -> execution.completed stored"},
        "events_per_execution": statistics.median(events),
        "duplicate_commands": duplicates,
    }


async def dead_letters(js: JetStreamContext, shards: int) -> int:
    return sum([(await js.stream_info(dlq_stream(s))).state.messages for s in range(shards)])


# --------------------------------------------------------------------------- run


@dataclass
class Measured:
    """The latency phase's executions (id -> WAL history) and its window (epoch ns), for the profile."""

    histories: dict[str, History] = field(default_factory=dict)
    window: tuple[int, int] = (0, 0)


async def run(parts: Parts, topology: Topology, args: argparse.Namespace, measured: Measured) -> dict[str, Any]:
    nc = await connect([parts.url], name="bench-steps")
    ends = Ends()
    try:
        js = nc.jetstream()
        shards = topology.shard_count
        await js.add_stream(StreamConfig(name=FLOOR_STREAM, subjects=["benchfloor.>"], storage=StorageType.FILE,
                                         max_msgs=10_000))  # fmt: skip
        catalog = Catalog(await js.key_value(CATALOG_BUCKET))
        path = f"bench/linear{args.steps}"
        projects = projects_per_shard(shards)
        for project in projects:
            await catalog.register(TENANT, project, linear_playbook(path, args.steps), policy=Policy())
            await catalog.register(TENANT, project, linear_playbook("bench/one", 1), policy=Policy())
        await wait_ready(js, parts, shards)
        await ends.start(js, shards)
        starter = Starter(js, topology)
        log(f"kernel and {len(parts.workers)} workers ready")

        floor_runs = [await floor(nc, js, parts.url, args.floor_requests // 2, args.floor_warmup)]
        log(f"floor: request-reply p50 {percentile(floor_runs[0]['request_reply'], 50):.3f} ms")

        project = projects[0]
        load_before = os.getloadavg()[0]
        log(f"latency: {args.warmup} warm-up and {args.executions} executions of {path} one at a time (shard 0)")
        if args.warmup:
            await latency(starter, ends, parts, project, path, args.warmup, args.steps, label="warm-up executions")
        cpu0, msgs0, started_ns = parts.cpu(), await asyncio.to_thread(connections, parts.monitor), time.time_ns()
        times, ids = await latency(starter, ends, parts, project, path, args.executions, args.steps, label="executions")
        window = (started_ns, time.time_ns())
        cpu_step = cpu_per(cpu0, parts.cpu(), args.executions * args.steps)
        msgs_step = msgs_per(msgs0, await asyncio.to_thread(connections, parts.monitor), args.executions * args.steps)

        floor_runs.append(await floor(nc, js, parts.url, args.floor_requests - args.floor_requests // 2, args.floor_warmup))
        log(f"floor again: request-reply p50 {percentile(floor_runs[1]['request_reply'], 50):.3f} ms")

        log(f"breakdown: reading {len(ids)} executions' WAL")
        histories = {x: await wal_history(js, 0, project, x) for x in ids}
        measured.histories, measured.window = histories, window
        cut = breakdown(list(histories.values()), args.steps)
        if cut["duplicate_commands"]:
            raise RuntimeError(f"{cut['duplicate_commands']} duplicate command.issued events")

        rates: list[float] = []
        burst_latencies: list[float] = []
        burst_cpu: list[dict[str, float]] = []
        burst_msgs: dict[str, Any] = {}
        for r in range(args.burst_warmup + args.rounds):
            label = "warm-up burst" if r < args.burst_warmup else f"burst {r - args.burst_warmup + 1}/{args.rounds}"
            log(f"{label}: {args.burst} one-step executions at once over {shards} shards")
            cpu0, msgs0 = parts.cpu(), await asyncio.to_thread(connections, parts.monitor)
            rate, lat = await burst(starter, ends, parts, projects, args.burst)
            log(f"{label}: {rate:,.1f} executions/s")
            if r >= args.burst_warmup:
                rates.append(rate)
                burst_latencies += lat
                burst_cpu.append(cpu_per(cpu0, parts.cpu(), args.burst))
                burst_msgs = msgs_per(msgs0, await asyncio.to_thread(connections, parts.monitor), args.burst)
        load_after = os.getloadavg()[0]

        dlq = await dead_letters(js, shards)
        if dlq:
            raise RuntimeError(f"{dlq} dead letters after the run (see the kernel and worker logs)")
    finally:
        await ends.stop()
        await close(nc)

    rtt = [x for f in floor_runs for x in f["request_reply"]]
    per_step = [t / args.steps for t in times]
    rtt_p50 = percentile(rtt, 50)
    step_p50 = percentile(per_step, 50)
    return {
        "bench": "steps",
        "goal_step_p50_ms": GOAL_STEP_P50_MS,
        "meets_goal": step_p50 <= GOAL_STEP_P50_MS,
        "per_step_ms": dist(per_step),
        "execution_ms": dist(times),
        "floor": {
            "request_reply_ms": dist(rtt) | {"p50_before": round(percentile(floor_runs[0]["request_reply"], 50), 3),
                                             "p50_after": round(percentile(floor_runs[1]["request_reply"], 50), 3),
                                             "what": "nats-py request() to a responder process, sequential"},
            "request_reply_in_process_ms": dist([x for f in floor_runs for x in f["request_reply_in_process"]]),
            "js_publish_ack_ms": dist([x for f in floor_runs for x in f["js_publish_ack"]])
            | {"what": "js.publish() to a file-storage stream, acked, sequential"},
        },
        "ratio_step_p50_to_rtt_p50": round(step_p50 / rtt_p50, 2),
        "ratio_step_p99_to_rtt_p99": round(percentile(per_step, 99) / percentile(rtt, 99), 2),
        "breakdown": cut,
        # Over the latency phase: a step can be no faster than the CPU it needs on a busy host.
        "cpu_ms_per_step": cpu_step,
        # NATS messages each role sent and received per step (nats-server /connz): each is a syscall and a loop turn.
        "nats_msgs_per_step": msgs_step,
        "throughput": {
            "executions_per_s": {"median": round(statistics.median(rates), 1), "best": round(max(rates), 1),
                                 "rounds": [round(r, 1) for r in rates]},
            "burst_completion_ms": dist(burst_latencies) | {"what": "first publish -> each execution.completed"},
            "cpu_ms_per_execution": {k: round(statistics.median(c[k] for c in burst_cpu), 3) for k in burst_cpu[0]},
            "nats_msgs_per_execution": burst_msgs,
        },  # fmt: skip
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
    }


def profile_result(work: Path, args: argparse.Namespace, measured: Measured) -> dict[str, Any]:
    """What the kernel's and workers' timing hooks recorded over the latency phase, per step segment."""
    kernel = json.loads((work / "kernel.profile.json").read_text())
    workers = [r for i in range(args.workers) for r in json.loads((work / f"worker{i}.profile.json").read_text())]
    orchestrate = next(m.consumer for m in system_manifests(["orchestrate"]))
    return analyse(kernel, workers, measured.histories, orchestrate_consumer=f"{orchestrate}_0", window=measured.window)


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": nats_server_version(),
        "nats_py": dist_version("nats-py"),
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    manifests = {m.path: {"max_batch": m.max_batch, "linger_s": m.linger_s} for m in system_manifests()}
    return {
        "steps": args.steps,
        "executions": args.executions,
        "warmup_executions": args.warmup,
        "burst": args.burst,
        "rounds": args.rounds,
        "burst_warmup": args.burst_warmup,
        "workers": args.workers,
        "worker_concurrency": args.concurrency,
        "shards": args.shards,
        "floor_requests": args.floor_requests,
        "floor_body_bytes": len(FLOOR_BODY),
        "processes": "nats-server, "
        + ("`noetl-edge kernel --plugins orchestrate` + `--plugins project,materialize`" if args.split_kernels
           else "`noetl-edge kernel`")
        + f", {args.workers} x `noetl-edge worker`, responder, this client",
        "plugins": manifests,
        "log_level": args.log_level,
        "quick": args.quick,
        "profile": args.profile,
        "inline_steps": not args.no_inline,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark orchestration latency and throughput: per-step p50/p99 of a linear playbook of noop "
        "steps (execution.requested publish -> execution.completed in the WAL, divided by the steps), where "
        "the time of a step goes (from the WAL's store timestamps), and executions/s of one-step playbooks with "
        "two workers, against a raw nats-py request-reply round trip measured in the same run. The kernel and "
        "the workers are real `noetl-edge` processes. Prints one JSON object.",
    )
    p.add_argument("--quick", action="store_true", help="a fast smoke run (overrides the counts): 1 warm-up + 3 executions, one burst of 20, 200 floor "
                   "round trips")
    p.add_argument("--steps", type=int, default=20, help="steps of the linear playbook (default 20)")
    p.add_argument("--executions", type=int, default=30, help="counted sequential executions (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="uncounted executions first (default 3)")
    p.add_argument("--burst", type=int, default=200, help="one-step executions started at once (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="counted bursts (default 3)")
    p.add_argument("--burst-warmup", type=int, default=1, help="uncounted bursts first (default 1)")
    p.add_argument("--workers", type=int, default=2, help="`noetl-edge worker` processes (default 2)")
    p.add_argument("--concurrency", type=int, default=4, help="--concurrency of each worker (default 4, the CLI's)")
    p.add_argument("--shards", type=int, default=4, help="shard count (default 4)")
    p.add_argument("--floor-requests", type=int, default=2000, help="request-reply round trips of the floor (default 2000)")
    p.add_argument("--floor-warmup", type=int, default=200, help="uncounted round trips before each half (default 200)")
    p.add_argument("--log-level", default="warning", help="log level of the kernel and workers (default warning)")
    p.add_argument(
        "--split-kernels", action="store_true",
        help="run the orchestrator in a kernel process of its own (`kernel --plugins orchestrate`) beside a "
        "`kernel --plugins project,materialize`, instead of one kernel running all three",
    )
    p.add_argument(
        "--profile", action="store_true",
        help="run the kernel and workers with timing hooks (bench/steps_profile.py) and add a per-segment "
        "profile of the latency phase to the JSON (the hooks cost a little time themselves); the workers' "
        "segments need --no-inline (noop steps otherwise run inline, on no worker)",
    )
    p.add_argument(
        "--no-inline", action="store_true",
        help="every noop step crosses a worker (the kernel runs with NOETL_INLINE_STEPS=0), as before inline "
        "steps: the figures to set beside a default run's",
    )
    p.add_argument("--serve-responder", metavar="NATS_URL", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.executions, args.warmup, args.burst, args.rounds, args.burst_warmup = 3, 1, 20, 1, 0
        args.floor_requests, args.floor_warmup = 200, 20
    if min(args.steps, args.executions, args.burst, args.rounds, args.workers, args.concurrency, args.shards) < 1:
        p.error("--steps, --executions, --burst, --rounds, --workers, --concurrency and --shards must be >= 1")
    if args.warmup < 0 or args.burst_warmup < 0 or args.floor_warmup < 0 or args.floor_requests < 2:
        p.error("--warmup, --burst-warmup and --floor-warmup must be >= 0, --floor-requests >= 2")
    if args.steps > 100:
        p.error("--steps must be at most 100")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        # --serve ROLE OUT -- <noetl-edge arguments>: a kernel or worker with timing hooks (see --profile).
        role, out, sep, *rest = argv[1:]
        if sep != "--":
            raise SystemExit("usage: steps.py --serve kernel|worker OUT -- <noetl-edge arguments>")
        return serve(role, out, rest)
    args = parse_args(argv)
    if args.serve_responder:
        return serve_responder(args.serve_responder)
    configure_logging(level="warning")
    topology = default_topology(shard_count=args.shards)
    with tempfile.TemporaryDirectory(prefix="noetl-bench-steps-") as work:
        with EmbeddedServer(data_dir=Path(work) / "nats", topology=topology, port=0) as server:
            log(f"nats-server at {server.url} (data in {work})")

            async def boot() -> None:
                nc = await connect([server.url], name="bench-bootstrap")
                try:
                    await bootstrap(nc.jetstream(), topology)
                finally:
                    await close(nc)

            asyncio.run(boot())
            with processes(server, Path(work), args) as parts:
                measured = Measured()
                result = asyncio.run(run(parts, topology, args, measured))
        if args.profile:
            result["profile"] = profile_result(Path(work), args, measured)
    result["settings"] = settings(args)
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
