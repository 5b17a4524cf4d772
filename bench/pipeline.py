#!/usr/bin/env python
"""Pipeline benchmark: the whole of ``noetl-edge up`` under load, each figure beside its baseline from the same run.

What is measured
----------------
``noetl-edge up`` is started as a user runs it (a subprocess, a temporary data
directory, free ports, the defaults: 4 shards, the kernel, the worker pool and
the HTTP edge in one command). Beside it, two helper processes of this file:
a **baseline** HTTP server (``--serve-baseline``: a Starlette app whose one
route reads the request's JSON body and answers ``{"ok": true}``, served by
the very same ``edge.serve.serve``, Hypercorn config and uvloop choice as the
edge) and a **probe** (``--probe``) that GETs one warm projection through
``up``'s edge one request at a time (``--get-interval`` apart) while a phase
runs, in its own process so that the load generator's event loop never delays
its requests. Every response is checked.

1. **Edge idle** — the probe alone, ``--idle-gets`` warm GETs of an execution
   whose projection is inline in KV (``X-Noetl-Source: cache``, its ``ETag``
   checked). Measured before the loads and again after them.
2. **HTTP ingest** — ``--http-connections`` keep-alive connections (one
   ``httpx.AsyncClient`` each, one task each) POST one event a request, back
   to back, for ``--http-seconds``: to ``…/executions/{id}/events`` of
   ``up``'s edge (each connection its own execution, every answer 200 with one
   fresh ack), and to the baseline's endpoint with the same client and the
   same body. Rounds alternate baseline, edge; a first pair is a warm-up.
   Requests/s and p50/p99 per request; the goal is edge ≥ 0.5× the baseline
   with p99 ≤ 20 ms. The probe runs during the edge rounds.
3. **Sustained ingest, everything folded** — ``--events`` events over
   ``--executions`` executions (``execution.started``, steps entered and
   exited, ``user.*`` events, ``execution.completed``; the shapes of
   ``bench/soak.py``), built, encoded and published with nats-py
   ``publish_async`` and ``Nats-Msg-Id``, ``--window`` executions at a time
   with their events interleaved, every ack checked. The **baseline** is the
   same publishing to a plain file-storage stream (``PIPE_RAW``, its own
   subjects, nothing consuming it; deleted afterwards); then the same number of
   fresh events straight to the WAL subjects, and the clock runs from the first
   publish until the kernel's ``project``, ``materialize`` and ``orchestrate``
   consumers of every shard have nothing pending and nothing unacked. Reported:
   both rates, the lag of each consumer when publishing ended, how long after
   it each caught up, end-to-end events/s and its ratio to the raw rate (goal
   ≥ 0.8). The probe runs throughout.
4. **Orchestration** — ``--burst`` executions of a ``--steps``-step ``noop``
   playbook (registered through the edge in one project per shard), started
   through ``up``'s edge (``POST …/executions`` with the playbook, from
   ``--start-connections`` connections). Their ends are taken from the WAL (an
   ordered consumer per shard on ``execution.*``); steps/s = burst × steps /
   (last end − first start). Afterwards every execution is checked on the WAL:
   ended ``execution.completed`` (else *wrong*), exactly ``--steps``
   ``command.issued`` and ``step.exit`` events each (per-subject counts from
   the server's stream info: more is a *duplicate command*, fewer a missing
   one); a sample of projections is read back through the edge (COMPLETED,
   every step COMPLETED). Goal ≥ 1,500 steps/s, 0 wrong, 0 duplicates. The
   probe runs throughout.
5. **Ingest** — ``bench/ingest.py`` in a subprocess once ``up`` is stopped:
   ``Producer.publish_many`` against raw ``publish_async``, both in that run
   (its own embedded nats-server); its summary is included. Goal ≥ 1.0.

The load average (``os.getloadavg()``) at the start and the end and at the
start of each phase goes into the JSON, with the core count: the machine may be
shared, so read a figure beside it. Timings are never judged by the tests, only
the document's shape.

The single JSON result goes to stdout (and ``--json-out``); progress goes to
stderr. Every process is stopped on exit (also on errors).

Usage: ``python bench/pipeline.py [--quick] [--events N] [--executions M] [--burst B] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # first, also when PYTHONPATH names it: bench/edge.py must not shadow edge/

import httpx  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from bench.common import Proc, cpu_seconds, dist_version, nats_server_version, serve_until_signal  # noqa: E402
from bench.edge import percentile  # noqa: E402
from bench.soak import event_shape, projects  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.host import consumer_stream  # noqa: E402
from kernel.producer import MSG_ID  # noqa: E402
from natscluster.server import free_port  # noqa: E402
from locator.envelope import encode_envelope, new_event, subject_for  # noqa: E402
from locator.ids import Snowflake  # noqa: E402
from locator.subjects import wal_stream  # noqa: E402

SHARDS = 4
TENANT = "pipe"
FOLD_CONSUMERS = ("project", "materialize", "orchestrate")
RAW_STREAM = "PIPE_RAW"
PLAYBOOK = "bench/noop5"
GOALS = {
    "sustained_ratio": 0.8,
    "steps_per_s": 1500.0,
    "edge_p99_ms": 10.0,
    "http_ratio": 0.5,
    "http_p99_ms": 20.0,
    "ingest_ratio": 1.0,
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cli() -> list[str]:
    """``noetl-edge`` of this tree (``PYTHONPATH`` is set to it for the child: a copy of the tree benchmarks itself)."""
    return [sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main())"]


CHILD_ENV = {"PYTHONPATH": str(REPO_ROOT)}


def probe_line(name: str, probed: dict[str, Any]) -> None:
    """The probe's figures of a phase on stderr, so that an interrupted run still tells them."""
    samples = probed["samples"]
    if samples:
        log(f"edge during {name}: warm GET p50 {percentile(samples, 50):.2f} ms, p99 {percentile(samples, 99):.2f} ms, "
            f"{probed['errors']} error(s) of {len(samples)}")  # fmt: skip


def stats_ms(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    return {
        "samples": len(samples),
        "p50": round(percentile(samples, 50), 3),
        "p99": round(percentile(samples, 99), 3),
        "max": round(max(samples), 3),
        "best": round(min(samples), 3),
    }


# --------------------------------------------------------------------------- helper processes


def serve_baseline(bind: str) -> int:
    """The baseline: a trivial Starlette endpoint that reads a JSON body, on ``edge.serve.serve``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def events(request: Request) -> Response:
        await request.json()
        return JSONResponse({"ok": True})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return serve_until_signal(
        Starlette(routes=[Route("/events", events, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]), bind
    )


def probe(url: str, token: str, etag: str, interval: float, count: int, out: Path) -> int:
    """GET ``url`` one request at a time until SIGTERM (or ``count`` samples); milliseconds each to ``out``.

    A failed request (not 200 from the cache at ``etag``) is counted as an error, and its time is a sample
    too: that is how long a user waited for it.
    """
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    samples: list[float] = []
    errors: list[str] = []
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as client:
        print("ready", flush=True)
        while not stopping and (count == 0 or len(samples) < count):
            t0 = time.perf_counter()
            try:
                r = client.get(url)
                if r.status_code != 200 or r.headers.get("x-noetl-source") != "cache" or r.headers.get("etag") != etag:
                    errors.append(f"{r.status_code} {r.headers.get('x-noetl-source')} {r.headers.get('etag')} {r.text[:200]}")
            except httpx.TransportError as e:
                errors.append(repr(e))
            samples.append((time.perf_counter() - t0) * 1000)
            if interval > 0:
                time.sleep(interval)
    out.write_text(json.dumps({"samples": samples, "errors": len(errors), "first_error": errors[0] if errors else None}))
    return 0


@dataclass
class Up:
    proc: Proc
    nats_url: str
    http_url: str
    token: str
    work: Path

    def nats_pid(self) -> int | None:
        pid = self.proc.proc.pid
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "nats-server":
                        return int(child)
        return None


@contextlib.contextmanager
def started(
    work: Path, log_level: str, *, inline: bool = True, kernels: int = 1
) -> Iterator[tuple[Up, Proc, str]]:
    procs: list[Proc] = []
    try:
        data = work / "data"
        argv = [*_cli(), "up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0", "--log-level", log_level,
                "--kernels", str(kernels)]  # fmt: skip
        # The orchestrator runs noop steps itself unless told not to (docs/orchestrate.md, Inline steps).
        up_proc = Proc("up", argv, work, env={**CHILD_ENV, "NOETL_INLINE_STEPS": "1" if inline else "0"})
        procs.append(up_proc)
        ready = up_proc.line(timeout=90).split()
        if len(ready) != 3 or ready[0] != "ready":
            raise RuntimeError(f"unexpected ready line from up: {ready}")
        bind = f"127.0.0.1:{free_port('127.0.0.1')}"
        baseline = Proc("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", bind], work, env=CHILD_ENV)
        procs.append(baseline)
        if not baseline.line().startswith("ready http://"):
            raise RuntimeError(f"baseline: no ready line; stderr:\n{baseline.tail()}")
        up = Up(up_proc, ready[1], ready[2], (data / "token").read_text().strip(), work)
        yield up, baseline, f"http://{bind}"
    finally:
        for p in reversed(procs):
            p.stop()


class Probe:
    """The warm-GET probe process of one phase."""

    def __init__(self, up: Up, url: str, etag: str, name: str, interval: float, count: int = 0) -> None:
        self.out = up.work / f"probe-{name}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--probe", up.http_url + url, "--probe-etag", etag,
                "--probe-out", str(self.out), "--get-interval", str(interval), "--probe-count", str(count)]  # fmt: skip
        self.proc = Proc(f"probe-{name}", argv, up.work, env={**CHILD_ENV, "NOETL_PROBE_TOKEN": up.token})
        if self.proc.line() != "ready":
            raise RuntimeError(f"probe: no ready line; stderr:\n{self.proc.tail()}")

    def finish(self, *, wait: bool = False) -> dict[str, Any]:
        """``{"samples": [ms, …], "errors": n, "first_error": text | None}``."""
        if wait:
            self.proc.proc.wait(timeout=600)
        self.proc.stop()
        if self.proc.proc.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"probe failed ({self.proc.proc.returncode}); stderr:\n{self.proc.log_path.read_text()[-3000:]}")
        got: dict[str, Any] = json.loads(self.out.read_text())
        return got


# --------------------------------------------------------------------------- setup through the edge


def api(project: str) -> str:
    return f"/api/v1/tenants/{TENANT}/projects/{project}"


async def start_execution(client: httpx.AsyncClient, project: str, body: dict[str, Any]) -> tuple[str, int]:
    r = await client.post(f"{api(project)}/executions", json=body)
    if r.status_code != 202:
        raise RuntimeError(f"start in {project}: {r.status_code} {r.text[:300]}")
    doc = r.json()
    return str(doc["execution_id"]), int(doc["seq"])


async def warm_execution(client: httpx.AsyncClient, project: str) -> tuple[str, str]:
    """A 4-event execution that never ends (inline in KV); waited for until folded. (url, ETag)."""
    execution_id, _ = await start_execution(client, project, {"workload": {"warm": True}})
    url = f"{api(project)}/executions/{execution_id}"
    r = await client.post(f"{url}/events", json=[
        {"type": "execution.started"}, {"type": "step.enter", "step": "fetch", "attempt": 1},
        {"type": "step.exit", "step": "fetch", "attempt": 1, "payload": {"rows": 3}}, {"type": "user.note", "payload": {"x": 1}},
    ])  # fmt: skip
    if r.status_code != 200:
        raise RuntimeError(f"warm events: {r.status_code} {r.text[:300]}")
    last = max(a["seq"] for a in r.json()["acks"])
    deadline = time.monotonic() + 60
    while True:
        g = await client.get(url)
        if g.status_code == 200 and g.headers.get("x-noetl-source") == "cache" and g.headers.get("etag") == f'"{last}"':
            return url, f'"{last}"'
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm execution not folded into KV: {g.status_code} {dict(g.headers)}")
        await asyncio.sleep(0.1)


async def register_playbook(client: httpx.AsyncClient, project: str, steps: int) -> None:
    names = [f"s{i}" for i in range(steps)]
    body = {
        "path": PLAYBOOK,
        "version": 1,
        "steps": [
            {"name": n, "tool": {"kind": "noop"}, **({"next": [{"step": names[i + 1]}]} if i + 1 < steps else {})}
            for i, n in enumerate(names)
        ],
    }
    r = await client.put(f"{api(project)}/playbooks/{PLAYBOOK}", json=body)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"register {PLAYBOOK} in {project}: {r.status_code} {r.text[:300]}")


# --------------------------------------------------------------------------- consumers' lag


async def lag_by_kind(js: JetStreamContext, timeout: float = 60.0) -> dict[str, int]:
    """Pending + unacked messages of each folding consumer kind, summed over the shards."""
    out = dict.fromkeys(FOLD_CONSUMERS, 0)
    for shard in range(SHARDS):
        for kind in FOLD_CONSUMERS:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    info = await js.consumer_info(consumer_stream(kind, shard), f"{kind}_{shard}")
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no consumer {kind}_{shard}") from None
                    await asyncio.sleep(0.2)
            out[kind] += (info.num_pending or 0) + (info.num_ack_pending or 0)
    return out


async def wait_idle(js: JetStreamContext, up: Up, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum((await lag_by_kind(js)).values()):
        up.proc.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel's consumers still lag after {timeout:.0f}s: {await lag_by_kind(js)}")
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- HTTP ingest


@dataclass
class HttpRound:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: list[str]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def post_round(clients: Sequence[httpx.AsyncClient], urls: Sequence[str], seconds: float, *, edge: bool) -> HttpRound:
    """One task per client posts one event a request to its URL for ``seconds``; every answer is checked.

    An answer other than 200 is an error (counted, not a request done; its time is a latency sample: the
    client waited for it); a 200 without one fresh ack is a bug and stops the run.
    """
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    stop_at = 0.0

    async def worker(i: int) -> None:
        client, url, own = clients[i], urls[i], latencies[i]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await client.post(url, json={"type": "user.tick", "payload": {"n": len(own)}})
            own.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            if edge:
                acks = r.json()["acks"]
                if len(acks) != 1 or acks[0].get("duplicate") is not False or not acks[0].get("seq"):
                    raise RuntimeError(f"POST {url}: not one fresh ack: {acks}")

    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker(i) for i in range(len(clients))))
    elapsed = time.perf_counter() - t0
    flat = [x for own in latencies for x in own]
    return HttpRound(len(flat) - len(errors), elapsed, flat, errors)


async def http_ingest(up: Up, baseline_url: str, warm: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    n = args.http_connections
    headers = {"Authorization": f"Bearer {up.token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    edge_clients = [httpx.AsyncClient(base_url=up.http_url, headers=headers, limits=limits, timeout=60.0) for _ in range(n)]
    base_clients = [httpx.AsyncClient(base_url=baseline_url, headers=headers, limits=limits, timeout=60.0) for _ in range(n)]
    try:
        ps = projects()
        edge_urls = []
        for i, client in enumerate(edge_clients):
            execution_id, _ = await start_execution(client, ps[i % len(ps)], {"workload": {"http": i}})
            edge_urls.append(f"{api(ps[i % len(ps)])}/executions/{execution_id}/events")
        base_urls = ["/events"] * n
        base_rounds: list[HttpRound] = []
        edge_rounds: list[HttpRound] = []
        probe_runs: list[dict[str, Any]] = []
        for r in range(1 + args.http_rounds):
            b = await post_round(base_clients, base_urls, args.http_seconds, edge=False)
            p = Probe(up, warm[0], warm[1], f"http{r}", args.get_interval)
            try:
                e = await post_round(edge_clients, edge_urls, args.http_seconds, edge=True)
            finally:
                got = p.finish()
            label = "warm-up" if r == 0 else f"round {r}/{args.http_rounds}"
            log(f"http ingest {label}: baseline {b.rps:,.0f} req/s p99 {percentile(b.latencies_ms, 99):.1f} ms, "
                f"edge {e.rps:,.0f} req/s p99 {percentile(e.latencies_ms, 99):.1f} ms")  # fmt: skip
            probe_line(f"http ingest {label}", got)
            if r > 0:
                base_rounds.append(b)
                edge_rounds.append(e)
                probe_runs.append(got)
    finally:
        for c in edge_clients + base_clients:
            await c.aclose()

    def side(rounds: list[HttpRound]) -> dict[str, Any]:
        lat = [x for rr in rounds for x in rr.latencies_ms]
        errors = [e for rr in rounds for e in rr.errors]
        return {"rps_median": round(statistics.median(rr.rps for rr in rounds)), "rps_rounds": [round(rr.rps) for rr in rounds],
                **{k: v for k, v in stats_ms(lat).items() if k in ("p50", "p99", "samples")},
                "errors": len(errors), "first_error": errors[0] if errors else None}  # fmt: skip

    base, edge = side(base_rounds), side(edge_rounds)
    ratio = round(edge["rps_median"] / base["rps_median"], 3)
    return {
        "connections": n, "round_seconds": args.http_seconds, "rounds": args.http_rounds,
        "baseline_trivial_starlette": base, "edge_post_events": edge, "ratio": ratio,
        "goal_ratio": GOALS["http_ratio"], "goal_p99_ms": GOALS["http_p99_ms"],
        "meets_goal": ratio >= GOALS["http_ratio"] and edge["p99"] <= GOALS["http_p99_ms"] and edge["errors"] == 0,
        "probe": probe_runs,
    }  # fmt: skip


# --------------------------------------------------------------------------- sustained ingest


async def publish_all(
    js: JetStreamContext, subject_of: Callable[[str], str], executions: int, per: int, window: int, ids: Snowflake
) -> float:
    """``executions`` × ``per`` events, ``window`` executions at a time, interleaved; seconds from first publish to last ack."""
    ps = projects()
    t0 = time.perf_counter()
    done = 0
    while done < executions:
        n = min(window, executions - done)
        exec_ids = [ids.next_str() for _ in range(n)]
        futures: list[asyncio.Future[Any]] = []
        for k in range(per):
            for i, execution_id in enumerate(exec_ids):
                kind, step, attempt, payload = event_shape(k, per, done + i)
                env = new_event(tenant=TENANT, project=ps[(done + i) % len(ps)], execution_id=execution_id, type=kind,
                                step=step, attempt=attempt, payload=payload)  # fmt: skip
                subject = subject_of(subject_for(env, SHARDS))
                futures.append(await js.publish_async(subject, encode_envelope(env), headers={MSG_ID: env.event_id}))
        for ack in await asyncio.gather(*futures):
            if ack.duplicate or not ack.seq:
                raise RuntimeError(f"not a fresh ack: {ack!r}")
        done += n
    return time.perf_counter() - t0


async def sustained(js: JetStreamContext, up: Up, warm: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    per = args.events // args.executions
    events = per * args.executions
    ids = Snowflake()
    await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=["piperaw.>"], storage=StorageType.FILE, duplicate_window=120.0))
    try:
        log(f"sustained: baseline, {events:,} events to a plain stream")
        raw_s = await publish_all(js, lambda s: "piperaw." + s[4:], args.executions, per, args.window, ids)
        stored = (await js.stream_info(RAW_STREAM)).state.messages
        if stored != events:
            raise RuntimeError(f"{RAW_STREAM} holds {stored} messages, {events} published")
    finally:
        await js.delete_stream(RAW_STREAM)
    log(f"sustained: baseline {events / raw_s:,.0f} events/s; now {events:,} events to the WAL")
    await wait_idle(js, up, 120)
    load0 = loadavg()
    cpu0 = cpu_seconds(up.proc.proc.pid), cpu_seconds(up.nats_pid())
    p = Probe(up, warm[0], warm[1], "sustained", args.get_interval)
    try:
        t0 = time.perf_counter()
        pub_s = await publish_all(js, lambda s: s, args.executions, per, args.window, ids)
        lag_at_end = await lag_by_kind(js)
        log(f"sustained: published at {events / pub_s:,.0f} events/s; lag then {lag_at_end}")
        caught: dict[str, float] = {}
        deadline = time.perf_counter() + args.drain_timeout
        while len(caught) < len(FOLD_CONSUMERS):
            up.proc.check()
            lag = await lag_by_kind(js)
            now = time.perf_counter()
            for kind, pending in lag.items():
                if pending == 0 and kind not in caught:
                    caught[kind] = round(now - t0 - pub_s, 2)
            if now > deadline:
                raise RuntimeError(f"the kernel's consumers still lag {args.drain_timeout:.0f}s after publishing: {lag}")
            if len(caught) < len(FOLD_CONSUMERS):
                await asyncio.sleep(0.1)
        total_s = time.perf_counter() - t0
    finally:
        probed = p.finish()
    cpu1 = cpu_seconds(up.proc.proc.pid), cpu_seconds(up.nats_pid())
    raw_rate, e2e_rate = events / raw_s, events / total_s
    ratio = round(e2e_rate / raw_rate, 3)
    log(f"sustained: end to end {e2e_rate:,.0f} events/s in {total_s:.1f}s ({ratio:.2f}x the raw rate)")
    probe_line("sustained ingest", probed)
    return {
        "events": events, "executions": args.executions, "events_per_execution": per, "window": args.window,
        "baseline_raw_publish": {"seconds": round(raw_s, 2), "events_per_s": round(raw_rate)},
        "wal_publish": {"seconds": round(pub_s, 2), "events_per_s": round(events / pub_s)},
        "lag_at_publish_end": lag_at_end, "caught_up_after_publish_s": caught,
        "end_to_end": {"seconds": round(total_s, 2), "events_per_s": round(e2e_rate)},
        "ratio": ratio, "goal_ratio": GOALS["sustained_ratio"], "meets_goal": ratio >= GOALS["sustained_ratio"],
        "cpu_cores": {"up": round((cpu1[0] - cpu0[0]) / total_s, 2), "nats_server": round((cpu1[1] - cpu0[1]) / total_s, 2)},
        "loadavg_at_start": load0,
        "probe": probed,
    }  # fmt: skip


# --------------------------------------------------------------------------- orchestration


class Ends:
    """Each execution's terminal event and when this process got it (an ordered consumer per shard)."""

    def __init__(self) -> None:
        self.ended: dict[str, tuple[float, str]] = {}
        self.subs: list[Any] = []

    async def start(self, js: JetStreamContext) -> None:
        async def on_msg(msg: Msg) -> None:
            tokens = msg.subject.split(".", 5)
            if tokens[5] in ("execution.completed", "execution.failed", "execution.cancelled"):
                self.ended.setdefault(tokens[4], (time.perf_counter(), tokens[5]))

        for shard in range(SHARDS):
            self.subs.append(await js.subscribe(
                f"wal.{shard}.{TENANT}.*.*.execution.*", stream=wal_stream(shard), ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW), cb=on_msg,
            ))  # fmt: skip

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def subject_counts(nc: NATS, stream: str, subjects_filter: str) -> dict[str, int]:
    """Messages per subject of ``stream`` matching ``subjects_filter`` (the server's stream info, paged)."""
    out: dict[str, int] = {}
    while True:
        req = json.dumps({"subjects_filter": subjects_filter, "offset": len(out)}).encode()
        info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", req, timeout=30)).data)
        if "error" in info:
            raise RuntimeError(f"stream info {stream}: {info['error']}")
        page = info["state"].get("subjects") or {}
        out.update(page)
        if not page or len(out) >= info.get("total", len(out)):
            return out


async def orchestration(nc: NATS, js: JetStreamContext, up: Up, warm: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    ps = projects()
    headers = {"Authorization": f"Bearer {up.token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=up.http_url, headers=headers, limits=limits, timeout=60.0)
               for _ in range(args.start_connections)]  # fmt: skip
    ends = Ends()
    await ends.start(js)
    project_of: dict[str, str] = {}
    try:
        for p_name in ps:
            await register_playbook(clients[0], p_name, args.steps)
        await wait_idle(js, up, 120)
        load0 = loadavg()
        cpu0 = cpu_seconds(up.proc.proc.pid), cpu_seconds(up.nats_pid())
        probe_p = Probe(up, warm[0], warm[1], "orchestration", args.get_interval)
        try:
            queue = iter(range(args.burst))
            t0 = time.perf_counter()

            nonce = Snowflake().next_str()
            retried: list[str] = []

            async def starter(client: httpx.AsyncClient) -> None:
                # As a careful client starts: with an Idempotency-Key, retried (same key) on a 5xx or a lost answer.
                for i in queue:
                    project = ps[i % len(ps)]
                    body = {"playbook": {"path": PLAYBOOK}, "workload": {"i": i}}
                    for attempt in range(args.start_retries + 1):
                        try:
                            r = await client.post(f"{api(project)}/executions", json=body,
                                                  headers={"Idempotency-Key": f"{nonce}-{i}"})  # fmt: skip
                        except httpx.TransportError as e:
                            retried.append(repr(e))
                            continue
                        if r.status_code in (200, 202):
                            project_of[str(r.json()["execution_id"])] = project
                            break
                        if r.status_code < 500 or attempt == args.start_retries:
                            raise RuntimeError(f"start {i} in {project}: {r.status_code} {r.text[:300]}")
                        retried.append(f"{r.status_code} {r.text[:200]}")
                        await asyncio.sleep(0.2 * (attempt + 1))

            await asyncio.gather(*(starter(c) for c in clients))
            started_s = time.perf_counter() - t0
            if len(project_of) != args.burst:
                raise RuntimeError(f"{args.burst} starts made {len(project_of)} executions")
            log(f"orchestration: {args.burst:,} started in {started_s:.1f}s")
            deadline = time.perf_counter() + args.drain_timeout
            while any(e not in ends.ended for e in project_of):
                up.proc.check()
                if time.perf_counter() > deadline:
                    missing = sum(1 for e in project_of if e not in ends.ended)
                    raise RuntimeError(f"{missing} execution(s) did not end within {args.drain_timeout:.0f}s")
                await asyncio.sleep(0.1)
            last = max(ends.ended[e][0] for e in project_of)
            total_s = last - t0
        finally:
            probed = probe_p.finish()
        cpu1 = cpu_seconds(up.proc.proc.pid), cpu_seconds(up.nats_pid())
        wrong = sorted(e for e in project_of if ends.ended[e][1] != "execution.completed")
        # Exactly one command.issued and one step.exit per step: counted per execution on the WAL.
        issued: dict[str, int] = {}
        exits: dict[str, int] = {}
        for shard in range(SHARDS):
            for subj, n in (await subject_counts(nc, wal_stream(shard), f"wal.{shard}.{TENANT}.*.*.command.issued")).items():
                issued[subj.split(".")[4]] = n
            for subj, n in (await subject_counts(nc, wal_stream(shard), f"wal.{shard}.{TENANT}.*.*.step.exit")).items():
                exits[subj.split(".")[4]] = n
        duplicates = sum(max(0, issued.get(e, 0) - args.steps) for e in project_of)
        missing_cmds = sum(max(0, args.steps - issued.get(e, 0)) for e in project_of)
        bad_exits = sum(1 for e in project_of if exits.get(e, 0) != args.steps)
        # The served projections are checked once system/project has folded everything (it may still be folding
        # the last executions' events when their ends are seen on the WAL).
        await wait_idle(js, up, args.drain_timeout)
        sample = sorted(project_of)[:: max(1, len(project_of) // args.check_sample)][: args.check_sample]
        bad_projections = 0
        for e in sample:
            r = await clients[0].get(f"{api(project_of[e])}/executions/{e}")
            body = r.json() if r.status_code == 200 else {}
            steps = body.get("steps", {})
            if body.get("status") != "COMPLETED" or len(steps) != args.steps or any(
                s.get("status") != "COMPLETED" for s in steps.values()
            ):
                bad_projections += 1
    finally:
        await ends.stop()
        for c in clients:
            await c.aclose()
    steps_per_s = args.burst * args.steps / total_s
    probe_line("orchestration", probed)
    log(f"orchestration: {args.burst:,} executions in {total_s:.1f}s, {steps_per_s:,.0f} steps/s, wrong {len(wrong)}, "
        f"duplicate commands {duplicates}")  # fmt: skip
    return {
        "executions": args.burst, "steps_per_execution": args.steps, "start_connections": args.start_connections,
        "starts_seconds": round(started_s, 2), "seconds": round(total_s, 2),
        "start_retries": len(retried), "first_start_retry": retried[0] if retried else None,
        "steps_per_s": round(steps_per_s), "executions_per_s": round(args.burst / total_s, 1),
        "wrong": len(wrong), "duplicate_commands": duplicates, "missing_commands": missing_cmds,
        "executions_without_exactly_one_exit_per_step": bad_exits,
        "projections_checked": len(sample), "projections_wrong": bad_projections,
        "goal_steps_per_s": GOALS["steps_per_s"],
        "meets_goal": steps_per_s >= GOALS["steps_per_s"] and not wrong and duplicates == 0 and missing_cmds == 0
        and bad_exits == 0 and bad_projections == 0,
        "cpu_cores": {"up": round((cpu1[0] - cpu0[0]) / total_s, 2), "nats_server": round((cpu1[1] - cpu0[1]) / total_s, 2)},
        "loadavg_at_start": load0,
        "probe": probed,
    }  # fmt: skip


# --------------------------------------------------------------------------- ingest (bench/ingest.py)


def ingest(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    argv = [sys.executable, str(REPO_ROOT / "bench" / "ingest.py"), "--events", str(args.ingest_events),
            "--rounds", str(args.ingest_rounds), "--single-events", "0"]  # fmt: skip
    log(f"ingest: {' '.join(argv[1:])}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}, **CHILD_ENV})  # fmt: skip
    (work / "ingest.stderr").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/ingest.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    keep = ("events_per_round", "rounds", "baseline_publish_async_eps", "producer_publish_many_eps", "ratio_median", "ratio_best")
    doc = {k: out[k] for k in keep}
    doc["goal_ratio"] = GOALS["ingest_ratio"]
    doc["meets_goal"] = out["ratio_median"] >= GOALS["ingest_ratio"]
    return doc


# --------------------------------------------------------------------------- run


async def measure(up: Up, baseline_url: str, args: argparse.Namespace) -> dict[str, Any]:
    nc = await connect([up.nats_url], name="bench-pipeline")
    try:
        js = nc.jetstream(timeout=30)
        headers = {"Authorization": f"Bearer {up.token}"}
        async with httpx.AsyncClient(base_url=up.http_url, headers=headers, timeout=30.0) as client:
            warm = await warm_execution(client, projects()[2])
        phases: dict[str, Any] = {}

        async def idle(name: str) -> dict[str, Any]:
            await wait_idle(js, up, 120)
            got = Probe(up, warm[0], warm[1], name, args.get_interval, args.idle_gets).finish(wait=True)
            samples = got["samples"]
            log(f"edge {name}: warm GET p50 {percentile(samples, 50):.2f} ms, p99 {percentile(samples, 99):.2f} ms")
            return got

        async def timed(name: str, coro: Awaitable[dict[str, Any]]) -> None:
            load = loadavg()
            phases[name] = await coro
            phases[name].setdefault("loadavg_at_start", load)

        idle_before = await idle("idle_before")
        await timed("http_ingest", http_ingest(up, baseline_url, warm, args))
        await timed("sustained_ingest", sustained(js, up, warm, args))
        await timed("orchestration", orchestration(nc, js, up, warm, args))
        idle_after = await idle("idle_after")
        dead = 0
        for shard in range(SHARDS):
            with contextlib.suppress(NotFoundError):
                dead += (await js.stream_info(f"DLQ_{shard}")).state.messages
        if dead:
            raise RuntimeError(f"{dead} dead letter(s) after the run")
    finally:
        await close(nc)

    loaded = {
        "during_http_ingest": phases["http_ingest"].pop("probe"),
        "during_sustained_ingest": [phases["sustained_ingest"].pop("probe")],
        "during_orchestration": [phases["orchestration"].pop("probe")],
    }
    def probe_stats(*runs: dict[str, Any]) -> dict[str, Any]:
        errors = [r["first_error"] for r in runs if r["first_error"]]
        return {**stats_ms([x for r in runs for x in r["samples"]]), "errors": sum(r["errors"] for r in runs),
                "first_error": errors[0] if errors else None}  # fmt: skip

    idle_stats = probe_stats(idle_before, idle_after)
    edge_doc: dict[str, Any] = {
        "get_interval_s": args.get_interval,
        "idle": idle_stats, "idle_before": probe_stats(idle_before), "idle_after": probe_stats(idle_after),
        **{name: probe_stats(*runs) for name, runs in loaded.items()},
        "goal_p99_ms": GOALS["edge_p99_ms"],
    }  # fmt: skip
    edge_doc["p99_over_idle_p99"] = {
        name: round(edge_doc[name]["p99"] / idle_stats["p99"], 2) for name in loaded if edge_doc[name]["samples"]
    }
    edge_doc["meets_goal"] = all(
        edge_doc[name].get("p99", 1e9) <= GOALS["edge_p99_ms"] and edge_doc[name]["errors"] == 0 for name in loaded
    )
    return {**phases, "edge_under_load": edge_doc}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("events", "executions", "window", "burst", "steps", "start_connections", "http_connections", "http_seconds",
            "http_rounds", "idle_gets", "get_interval", "ingest_events", "ingest_rounds", "drain_timeout")  # fmt: skip
    return {**{k: getattr(args, k) for k in keys}, "inline_steps": not args.no_inline, "kernels": args.kernels}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the whole pipeline of `noetl-edge up`: sustained ingest until everything is folded, "
        "orchestrated noop executions through the edge, warm GETs while each load runs, HTTP event ingest and "
        "Producer.publish_many — each beside its baseline measured in the same run. Prints one JSON document.",
    )
    p.add_argument("--quick", action="store_true", help="a small run for tests (the figures mean little)")
    p.add_argument("--events", type=int, default=250_000, help="events of the sustained-ingest phase (default 250000)")
    p.add_argument("--executions", type=int, default=10_000, help="executions they belong to (default 10000)")
    p.add_argument("--window", type=int, default=500, help="executions published at a time, interleaved (default 500)")
    p.add_argument("--burst", type=int, default=10_000, help="orchestrated executions started at once (default 10000)")
    p.add_argument("--steps", type=int, default=5, help="noop steps of the orchestrated playbook (default 5)")
    p.add_argument("--start-connections", type=int, default=32, help="connections starting the burst (default 32)")
    p.add_argument("--http-connections", type=int, default=32, help="connections of the HTTP ingest phase (default 32)")
    p.add_argument("--http-seconds", type=float, default=10.0, help="seconds per HTTP ingest round per side (default 10)")
    p.add_argument("--http-rounds", type=int, default=2, help="counted HTTP ingest rounds after a warm-up (default 2)")
    p.add_argument("--idle-gets", type=int, default=1000, help="warm GETs of each idle probe (default 1000)")
    p.add_argument("--get-interval", type=float, default=0.005, help="seconds between the probe's GETs (default 0.005)")
    p.add_argument("--ingest-events", type=int, default=20_000, help="events per side per round of bench/ingest.py")
    p.add_argument("--ingest-rounds", type=int, default=3, help="rounds of bench/ingest.py (default 3)")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds a phase may wait for the kernel (default 600)")
    p.add_argument("--start-retries", type=int, default=5, help="retries of a start answered 5xx (default 5)")
    p.add_argument("--check-sample", type=int, default=50, help="orchestrated projections read back and checked (default 50)")
    p.add_argument("--json-out", type=Path, help="also write the JSON document to this file")
    p.add_argument("--log-level", default="warning", help="log level of up on stderr (default warning)")
    p.add_argument("--kernels", type=int, default=1, help="up --kernels: kernel processes sharing the shards (default 1)")
    p.add_argument("--no-inline", action="store_true",
                   help="run up with NOETL_INLINE_STEPS=0: every noop step crosses a worker, as before inline steps")
    p.add_argument("--serve-baseline", metavar="HOST:PORT", help=argparse.SUPPRESS)
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--probe-etag", help=argparse.SUPPRESS)
    p.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.executions, args.window, args.burst = 2_000, 200, 100, 40
        args.http_seconds, args.http_rounds, args.idle_gets = 1.0, 1, 50
        args.ingest_events, args.ingest_rounds, args.check_sample = 2_000, 1, 10
        args.start_connections, args.http_connections = 8, 8
    if args.executions < 1 or args.events < 2 * args.executions:
        p.error("--executions must be >= 1 and --events at least twice --executions")
    if min(args.window, args.burst, args.steps, args.start_connections, args.http_connections, args.http_rounds) < 1:
        p.error("--window, --burst, --steps, --start-connections, --http-connections and --http-rounds must be >= 1")
    if args.http_seconds <= 0 or args.get_interval < 0 or args.idle_gets < 1 or args.check_sample < 1:
        p.error("--http-seconds must be > 0, --get-interval >= 0, --idle-gets and --check-sample >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline)
    if args.probe:
        return probe(args.probe, os.environ["NOETL_PROBE_TOKEN"], args.probe_etag, args.get_interval, args.probe_count,
                     args.probe_out)  # fmt: skip
    # SIGTERM stops the run as Ctrl-C does (every child process is stopped on the way out).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    load_start = loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        with started(work, args.log_level, inline=not args.no_inline, kernels=args.kernels) as (up, _baseline, baseline_url):
            figures = asyncio.run(measure(up, baseline_url, args))
        figures["ingest"] = ingest(args, work)
    doc: dict[str, Any] = {
        "bench": "pipeline",
        "quick": args.quick,
        "settings": settings(args),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "loadavg_start": load_start,
        **figures,
        "goals_met": {k: figures[k]["meets_goal"] for k in ("sustained_ingest", "orchestration", "edge_under_load",
                                                            "http_ingest", "ingest")},  # fmt: skip
        "loadavg_end": loadavg(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "versions": {"nats_server": nats_server_version(), "nats_py": dist_version("nats-py"),
                     "hypercorn": dist_version("hypercorn"), "starlette": dist_version("starlette")},  # fmt: skip
    }
    text = json.dumps(doc, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
