#!/usr/bin/env python
"""Edge benchmark: warm projection GETs through Hypercorn against a trivial Starlette endpoint, in one run.

What is measured
----------------
Three processes are started, each on its own port:

* ``noetl-edge up`` — the embedded nats-server, bootstrap, and a kernel that
  folds every shard into the KV cache and writes Feather segments. It only
  provides the data; its own HTTP edge is not measured.
* **edge** — ``noetl-edge edge --bind … --nats-url <up's NATS>``: the stateless
  edge exactly as deployed (``edge.serve.serve`` → Hypercorn with
  ``edge.serve.hypercorn_config``, uvloop when installed).
* **baseline** — this file with ``--serve-baseline``: a Starlette app with one
  route returning ``JSONResponse({"status": "ok"})``, served by the very same
  ``edge.serve.serve`` (same ``hypercorn_config``, same uvloop choice).

Setup (not timed): through the edge's HTTP API, a *warm* execution (start + 4
events, folded by the kernel into the KV cache) and two 1,000-event executions
on different shards. Once the kernel's ``project`` and ``materialize``
consumers have nothing pending, the KV entries of both big executions are
purged, and every segment of the second one's shard is deleted: the first is
then served from its **snapshot** (the read path scans the shard's newest
segments), the second by **replay** of its 1,000 WAL events.

Throughput — the load generator is ``--connections`` ``httpx.AsyncClient``
objects in this process, each limited to one HTTP/1.1 keep-alive connection,
with one task per connection issuing GETs back to back for ``--round-seconds``
(one client per connection because a single httpx pool slows down sharply with
many concurrent connections). Rounds alternate baseline, edge, baseline, edge,
…; the first (warm-up) pair is not counted. Every response is checked (200; for
the edge ``X-Noetl-Source: cache``). Both sides send the same
``Authorization`` header. The CPU time of each server process, of nats-server
and of this client during a round is reported as cores in use, and the server
CPU per request of each side (``server_cpu_us_per_request``); their quotient
``cpu_cost_ratio`` (baseline / edge) is the ratio a server-bound run would
approach — when the client is the bottleneck (few cores), ``ratio_median``
flatters the edge. ``wrk`` is run in addition when it is on PATH.

Latency — one request at a time (concurrency 1), alternating per round:
baseline, warm edge GET, snapshot-served GET, replay-served GET; p50/p99 over
all counted samples (milliseconds), plus the median of the per-round p50s.

The single JSON result goes to stdout; progress goes to stderr. Every process
is stopped on exit (also on errors and Ctrl-C).

Usage: ``python bench/edge.py [--connections C] [--round-seconds S] [--rounds R] [--latency-samples N]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
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
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

if importlib.util.find_spec("sniffio") is None:
    # httpcore tries `import sniffio` on every request; a failed import rescans sys.path each time
    # (about 1 ms here). None in sys.modules makes it fail at once, and httpcore then assumes asyncio.
    sys.modules["sniffio"] = None  # type: ignore[assignment]

import httpx  # noqa: E402

from bench.common import Proc, cpu_seconds, dist_version, serve_until_signal  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.host import consumer_stream  # noqa: E402
from natscluster.server import free_port  # noqa: E402
from locator.shard import shard_for  # noqa: E402
from locator.subjects import wal_stream  # noqa: E402
from projector.cache import KvProjectionCache  # noqa: E402
from projector.snapshots import SnapshotStore  # noqa: E402

GOAL_RATIO = 0.7
SHARDS = 4
PROJECT = "bench"
BIG_EVENTS = 1_000
STEPS = 50


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- baseline server


def serve_baseline(bind: str) -> int:
    """The baseline process: a trivial Starlette JSON endpoint on ``edge.serve.serve`` (same Hypercorn config)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def ok(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return serve_until_signal(Starlette(routes=[Route("/ok", ok, methods=["GET"]), Route("/healthz", ok, methods=["GET"])]), bind)


# --------------------------------------------------------------------------- processes


def child_pid(pid: int) -> int | None:
    """The first child of ``pid`` (up's nats-server), from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@dataclass
class Servers:
    up: Proc
    edge: Proc
    baseline: Proc
    nats_url: str
    edge_url: str
    baseline_url: str
    data_dir: Path
    token: str

    @property
    def nats_pid(self) -> int | None:
        return child_pid(self.up.proc.pid)


@contextlib.contextmanager
def servers(work: Path, log_level: str) -> Iterator[Servers]:
    started: list[Proc] = []
    try:
        data = work / "data"
        up = Proc("up", [_cli(), "up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0", "--log-level", log_level], work)
        started.append(up)
        ready = up.line().split()
        if len(ready) != 3 or ready[0] != "ready":
            raise RuntimeError(f"unexpected ready line from up: {ready}")
        nats_url = ready[1]
        edge_bind = f"127.0.0.1:{free_port()}"
        edge = Proc(
            "edge",
            [_cli(), "edge", "--bind", edge_bind, "--nats-url", nats_url, "--data-dir", str(data), "--log-level", log_level],
            work,
        )
        started.append(edge)
        base_bind = f"127.0.0.1:{free_port()}"
        baseline = Proc("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", base_bind], work)
        started.append(baseline)
        for p in (edge, baseline):
            if not p.line().startswith("ready http://"):
                raise RuntimeError(f"{p.name}: no ready line; stderr:\n{p.tail()}")
        token = (data / "token").read_text().strip()
        yield Servers(up, edge, baseline, nats_url, f"http://{edge_bind}", f"http://{base_bind}", data, token)
    finally:
        for p in reversed(started):
            p.stop()


def _cli() -> str:
    found = Path(sys.executable).parent / "noetl-edge"
    return str(found) if found.exists() else shutil.which("noetl-edge") or "noetl-edge"


async def wait_listening(url: str, proc: Proc, timeout: float = 30.0) -> None:
    # `noetl-edge edge` prints "ready" before Hypercorn has bound its socket: poll /healthz.
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as client:
        while True:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited; stderr:\n{proc.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not listening after {timeout}s; stderr:\n{proc.tail()}")
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- data setup


def tenant_on(shard: int, avoid: str = "") -> str:
    for i in range(10_000):
        t = f"b{i}"
        if t != avoid and shard_for(t, PROJECT, "", SHARDS) == shard:
            return t
    raise RuntimeError(f"no tenant on shard {shard}")


def big_history() -> list[dict[str, Any]]:
    """999 events after execution.requested: steps entered and exited, with progress events between."""
    events: list[dict[str, Any]] = [{"type": "execution.started"}]
    i = 0
    while len(events) < BIG_EVENTS - 1:
        step = f"s{i % STEPS}"
        attempt = i // STEPS + 1
        events.append({"type": "step.enter", "step": step, "attempt": attempt})
        events.append({"type": "user.progress", "payload": {"step": step, "done": i}})
        events.append({"type": "step.exit", "step": step, "attempt": attempt, "payload": {"rows": i, "ok": True}})
        i += 1
    return events[: BIG_EVENTS - 1]


@dataclass
class Target:
    name: str
    url: str
    source: str | None  # the X-Noetl-Source every response must carry (None: not checked)
    last_seq: int = 0
    body_bytes: int = 0


async def start_execution(client: httpx.AsyncClient, tenant: str, events: list[dict[str, Any]]) -> tuple[str, int]:
    base = f"/api/v1/tenants/{tenant}/projects/{PROJECT}/executions"
    r = await client.post(base, json={"workload": {"bench": True}})
    r.raise_for_status()
    execution_id: str = r.json()["execution_id"]
    last = int(r.json()["seq"])
    for i in range(0, len(events), 100):
        resp = await client.post(f"{base}/{execution_id}/events", json=events[i : i + 100])
        if resp.status_code != 200:
            raise RuntimeError(f"publishing events failed: {resp.status_code} {resp.text[:500]}")
        last = max(a["seq"] for a in resp.json()["acks"])
    return f"{base}/{execution_id}", last


async def wait_source(client: httpx.AsyncClient, url: str, source: str, last_seq: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(url)
        if r.status_code == 200 and r.headers["x-noetl-source"] == source and r.headers["etag"] == f'"{last_seq}"':
            return len(r.content)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: wanted source {source} at seq {last_seq}, got {r.status_code} {dict(r.headers)}")
        await asyncio.sleep(0.1)


async def wait_consumers_idle(js: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pending = 0
        for shard in range(SHARDS):
            for consumer in ("project", "materialize"):
                info = await js.consumer_info(consumer_stream(consumer, shard), f"{consumer}_{shard}")
                pending += (info.num_pending or 0) + (info.num_ack_pending or 0)
        if pending == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"kernel consumers still have {pending} message(s) pending after {timeout}s")
        await asyncio.sleep(0.2)


async def prepare(s: Servers) -> tuple[Target, Target, Target, dict[str, Any]]:
    """Warm, snapshot-served and replay-served targets (see the module docstring)."""
    snap_shard, replay_shard = 0, 1
    warm_tenant = tenant_on(2)
    snap_tenant, replay_tenant = tenant_on(snap_shard), tenant_on(replay_shard)
    headers = {"Authorization": f"Bearer {s.token}"}
    async with httpx.AsyncClient(base_url=s.edge_url, headers=headers, timeout=30.0) as client:
        small: list[dict[str, Any]] = [
            {"type": "execution.started"},
            {"type": "step.enter", "step": "fetch", "attempt": 1},
            {"type": "step.exit", "step": "fetch", "attempt": 1, "payload": {"rows": 3}},
            {"type": "user.note", "payload": {"hello": "world"}},
        ]
        history = big_history()
        warm_url, warm_seq = await start_execution(client, warm_tenant, small)
        snap_url, snap_seq = await start_execution(client, snap_tenant, history)
        replay_url, replay_seq = await start_execution(client, replay_tenant, history)
        log(f"published 1 + {len(small)} and 2 x {BIG_EVENTS} events; waiting for the kernel")
        warm_bytes = await wait_source(client, warm_url, "cache", warm_seq)
        big_bytes = await wait_source(client, snap_url, "cache", snap_seq)
        await wait_source(client, replay_url, "cache", replay_seq)
        nc = await connect([s.nats_url], name="bench-edge")
        try:
            js = nc.jetstream()
            await wait_consumers_idle(js)
            store = SnapshotStore.from_env(data_dir=s.data_dir, env={})
            for shard, url in ((snap_shard, snap_url), (replay_shard, replay_url)):
                await (await KvProjectionCache.open(js, shard)).delete(url.rsplit("/", 1)[1])
            replay_segments = store.list_segments(replay_shard)
            for uri in replay_segments:
                store.delete(uri)
            snap_segments = store.list_segments(snap_shard)
        finally:
            await close(nc)
        await wait_source(client, snap_url, "snapshot", snap_seq, timeout=5)
        await wait_source(client, replay_url, "replay", replay_seq, timeout=5)
    info = {
        "warm_execution_events": 1 + len(small),
        "warm_body_bytes": warm_bytes,
        "big_execution_events": BIG_EVENTS,
        "big_body_bytes": big_bytes,
        "snapshot_shard_segments": len(snap_segments),
        "replay_shard_segments_deleted": len(replay_segments),
    }
    return (
        Target("warm", warm_url, "cache", warm_seq, warm_bytes),
        Target("snapshot", snap_url, "snapshot", snap_seq, big_bytes),
        Target("replay", replay_url, "replay", replay_seq, big_bytes),
        info,
    )


# --------------------------------------------------------------------------- load


@dataclass
class Round:
    requests: int
    seconds: float
    cores: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def load_round(
    clients: Sequence[httpx.AsyncClient], url: str, source: str | None, seconds: float, pids: dict[str, int | None]
) -> Round:
    """One task per client (= per connection) GETs ``url`` back to back for ``seconds``; every response is checked."""
    counts = [0] * len(clients)
    stop_at = 0.0

    async def worker(i: int) -> None:
        n = 0
        client = clients[i]
        while time.perf_counter() < stop_at:
            r = await client.get(url)
            if r.status_code != 200 or (source is not None and r.headers.get("x-noetl-source") != source):
                raise RuntimeError(f"GET {url}: {r.status_code} {r.headers.get('x-noetl-source')} {r.text[:300]}")
            n += 1
        counts[i] = n

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker(i) for i in range(len(clients))))
    elapsed = time.perf_counter() - t0
    cores = {name: round((cpu_seconds(pid) - before[name]) / elapsed, 2) for name, pid in pids.items()}
    cores["client"] = round((time.process_time() - client_before) / elapsed, 2)
    return Round(sum(counts), elapsed, cores)


async def latencies(client: httpx.AsyncClient, target: Target, n: int) -> list[float]:
    """``n`` sequential GETs; milliseconds each."""
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get(target.url)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200 or (target.source is not None and r.headers.get("x-noetl-source") != target.source):
            raise RuntimeError(f"GET {target.url}: {r.status_code} {r.headers.get('x-noetl-source')} {r.text[:300]}")
        if target.last_seq and r.headers.get("etag") != f'"{target.last_seq}"':
            raise RuntimeError(f"GET {target.url}: ETag {r.headers.get('etag')}, expected seq {target.last_seq}")
        out.append(ms)
    return out


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def latency_stats(per_round: Sequence[Sequence[float]]) -> dict[str, Any]:
    samples = [x for r in per_round for x in r]
    return {
        "p50": round(percentile(samples, 50), 3),
        "p99": round(percentile(samples, 99), 3),
        "best": round(min(samples), 3),
        "median_of_round_p50": round(statistics.median(percentile(r, 50) for r in per_round), 3),
        "samples": len(samples),
    }


def rate_stats(rounds: Sequence[Round], server: str) -> dict[str, Any]:
    rates = [r.rps for r in rounds]
    return {
        "median": round(statistics.median(rates)),
        "best": round(max(rates)),
        "rounds": [round(x) for x in rates],
        "cores_median": {k: round(statistics.median(r.cores[k] for r in rounds), 2) for k in rounds[0].cores},
        "server_cpu_us_per_request": round(statistics.median(r.cores[server] * 1e6 / r.rps for r in rounds)),
    }


def run_wrk(url: str, token: str, connections: int, seconds: float) -> float | None:
    """Requests/s from ``wrk`` (one thread), if it is installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-H", f"Authorization: Bearer {token}", url],
        capture_output=True, text=True, timeout=seconds + 30, check=False,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


async def alternate(
    rounds: int, warmup: int, name_a: str, run_a: Callable[[], Awaitable[Any]], name_b: str, run_b: Callable[[], Awaitable[Any]]
) -> tuple[list[Any], list[Any]]:
    a: list[Any] = []
    b: list[Any] = []
    for r in range(warmup + rounds):
        ra, rb = await run_a(), await run_b()
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        log(f"{label}: {name_a} {_fmt(ra)}, {name_b} {_fmt(rb)}")
        if r >= warmup:
            a.append(ra)
            b.append(rb)
    return a, b


def _fmt(x: Any) -> str:
    if isinstance(x, Round):
        return f"{x.rps:,.0f} req/s (cores {x.cores})"
    if isinstance(x, dict):
        return ", ".join(f"{k} p50 {percentile(v, 50):.2f} ms" for k, v in x.items())
    if isinstance(x, list):
        return f"p50 {percentile(x, 50):.2f} ms"
    return str(x)


# --------------------------------------------------------------------------- main


async def run(s: Servers, args: argparse.Namespace) -> dict[str, Any]:
    await wait_listening(s.edge_url, s.edge)
    await wait_listening(s.baseline_url, s.baseline)
    warm, snap, rep, info = await prepare(s)
    headers = {"Authorization": f"Bearer {s.token}"}
    pids = {"edge": s.edge.proc.pid, "baseline": s.baseline.proc.pid, "nats": s.nats_pid}
    baseline = Target("baseline", "/ok", None)
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        # One client per connection: a single httpx pool degrades badly with many concurrent connections.
        def pool(url: str) -> list[httpx.AsyncClient]:
            out = [httpx.AsyncClient(base_url=url, headers=headers, limits=one, timeout=30.0) for _ in range(args.connections)]
            for c in out:
                stack.push_async_callback(c.aclose)
            return out

        edge_pool, base_pool = pool(s.edge_url), pool(s.baseline_url)
        edge_client, base_client = edge_pool[0], base_pool[0]
        log(f"throughput: {args.warmup} warm-up + {args.rounds} rounds of {args.round_seconds:g}s per side, "
            f"{args.connections} connections")
        base_rounds, edge_rounds = await alternate(
            args.rounds, args.warmup,
            "baseline", lambda: load_round(base_pool, baseline.url, None, args.round_seconds, pids),
            "edge", lambda: load_round(edge_pool, warm.url, "cache", args.round_seconds, pids),
        )

        n = args.latency_samples

        async def edge_latencies() -> dict[str, list[float]]:
            return {
                "warm": await latencies(edge_client, warm, n),
                "snapshot": await latencies(edge_client, snap, n),
                "replay": await latencies(edge_client, rep, max(1, n // 4)),
            }

        log(f"latency: {args.warmup} warm-up + {args.rounds} rounds, concurrency 1")
        base_lat, edge_lat = await alternate(
            args.rounds, args.warmup,
            "baseline", lambda: latencies(base_client, baseline, n),
            "edge", edge_latencies,
        )

    wrk: dict[str, Any] | None = None
    if shutil.which("wrk"):
        b = run_wrk(s.baseline_url + baseline.url, s.token, args.connections, args.round_seconds)
        e = run_wrk(s.edge_url + warm.url, s.token, args.connections, args.round_seconds)
        wrk = {"baseline_rps": b, "edge_rps": e, "ratio": round(e / b, 3) if b and e else None}

    b_med = statistics.median(r.rps for r in base_rounds)
    e_med = statistics.median(r.rps for r in edge_rounds)
    out: dict[str, Any] = {
        "bench": "edge",
        "load_generator": {
            "client": "httpx.AsyncClient per connection (HTTP/1.1 keep-alive), one task each, in the bench process",
            "connections": args.connections,
            "round_seconds": args.round_seconds,
            "wrk": "not installed" if wrk is None else wrk,
        },
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "baseline_trivial_rps": rate_stats(base_rounds, "baseline"),
        "edge_warm_get_rps": rate_stats(edge_rounds, "edge"),
        "ratio_median": round(e_med / b_med, 3),
        "ratio_best": round(max(r.rps for r in edge_rounds) / max(r.rps for r in base_rounds), 3),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": e_med / b_med >= GOAL_RATIO,
        # Server CPU per request, baseline / edge: the ratio a server-bound run would approach.
        "cpu_cost_ratio": round(
            statistics.median(r.cores["baseline"] / r.rps for r in base_rounds)
            / statistics.median(r.cores["edge"] / r.rps for r in edge_rounds), 3
        ),
        "latency_ms": {
            "baseline_trivial": latency_stats(base_lat),
            **{k: latency_stats([r[k] for r in edge_lat]) for k in ("warm", "snapshot", "replay")},
        },
        **info,
    }
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark warm projection GETs through Hypercorn (`noetl-edge edge`) against a trivial "
        "Starlette JSON endpoint on the same Hypercorn configuration (measured in the same run), plus "
        "snapshot- and replay-served GET latency for a 1,000-event execution. Prints one JSON object.",
    )
    p.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections of the load generator (default 16)")
    p.add_argument("--round-seconds", type=float, default=3.0, help="duration of one throughput round per side (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="counted rounds per comparison (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds first (default 1)")
    p.add_argument(
        "--latency-samples", type=int, default=40,
        help="sequential GETs per latency round for baseline, warm and snapshot (replay: a quarter; default 40)",
    )
    p.add_argument("--uvloop", action="store_true", help="run the load generator on uvloop (the servers use it when installed)")
    p.add_argument("--log-level", default="warning", help="log level of the server processes (default warning)")
    p.add_argument("--serve-baseline", metavar="HOST:PORT", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connections < 1 or args.rounds < 1 or args.warmup < 0 or args.round_seconds <= 0 or args.latency_samples < 4:
        p.error("--connections and --rounds must be >= 1, --warmup >= 0, --round-seconds > 0, --latency-samples >= 4")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline)
    from kernel.logs import configure_logging

    configure_logging(level="warning")
    loop_name = "asyncio"
    if args.uvloop:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    with tempfile.TemporaryDirectory(prefix="noetl-bench-edge-") as work, servers(Path(work), args.log_level) as s:
        log(f"up {s.nats_url}, edge {s.edge_url}, baseline {s.baseline_url}")
        result = asyncio.run(run(s, args))
    result["client_loop"] = loop_name
    result["cpus"] = os.cpu_count()
    for dist in ("hypercorn", "starlette", "httpx", "uvloop", "nats-py"):
        result[dist.replace("-", "_")] = dist_version(dist)
    result["python"] = platform.python_version()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
