#!/usr/bin/env python
"""Soak benchmark: a million events through ``noetl-edge up`` with a short history retention — what stays bounded.

What is measured
----------------
``noetl-edge up`` is started as a user runs it (a subprocess, a temporary data
directory, free ports) with ``NOETL_HISTORY_RETENTION`` short (``--retention``,
default ``20s``), so ``system/cleanup`` archives every ended execution's
history into Arrow IPC segments and purges it from the WAL while the load runs.

**Publishing.** N events (``--events``, default 1,000,000) over M executions
(``--executions``, default 100,000; N / M events each: ``execution.started``,
steps entered and exited, ``user.*`` events, ``execution.completed`` last),
spread over 4 projects, one per shard of the default topology. Envelopes are
built with ``locator.envelope.new_event`` and ``encode_envelope``, subjects
with ``subject_for``, and published straight to the WAL subjects with nats-py
``publish_async`` (header ``Nats-Msg-Id``), ``--window`` executions at a
time with their events interleaved; every ack is checked (stored, not a
duplicate). The rate is the one the whole pipeline sustains: before each
window the publisher waits while the kernel's ``project``, ``materialize``
and ``orchestrate`` consumers have more than ``--max-lag`` events pending,
or while more than ``--max-overdue`` executions that completed longer than
retention + slack + 10 s ago are not archived yet (``system/cleanup``
falling behind). The time held back by each cause is reported.

**Sampling** (every ``--sample-every`` seconds, while publishing and while
the archive catches up): per WAL stream ``messages``, ``num_subjects``,
``num_deleted`` and ``consumer_count`` (from ``$JS.API.STREAM.INFO``;
history readers create ephemeral ordered consumers); the keys of KV ``proj_<n>``
and ``hist_<n>`` (``num_subjects`` of ``KV_proj_<n>``/``KV_hist_<n>``);
nats-server's resident memory (VmRSS of ``up``'s nats-server child, from
/proc) and that of the ``up`` process itself; bytes and files under
``<data>/objects/history`` and ``<data>/objects/segments``. Each series is
reported over time with its peak, its last value and ``last / peak``, and a
``growth`` figure: the peak while the second half of the events was
published over the peak while the first half was (halves of the events, not
of the time, so a publisher held back late in the run changes nothing; about
2 for a series that grows with the total, about 1 for one that has
plateaued; plateaued means <= 1.25, judged only when each half has samples
and the events published by the end of the second are at least 1.5 times
those of the first, otherwise ``undetermined``). The JSON lists what plateaued, what grew and
what could not be told.

**Reads**, once every execution is archived (``hist`` keys = M, the WAL
empty; bounded by ``--drain-timeout``): a warm execution (4 events, never
completed, its projection inline in KV and read before) and, through ``up``'s
own HTTP edge, one request at a time, in rounds that alternate the order:

* ``baseline_trivial`` — ``GET /healthz`` of the same edge;
* ``warm`` — ``GET`` of the warm execution's projection (``X-Noetl-Source: cache``);
* ``cold`` — ``GET`` of a random archived execution, each read once (its KV
  entry is a pointer into a Feather segment; the edge reads the row, then
  finds nothing newer in the archive or the WAL);
* ``as_of_seq`` — ``GET …?as_of_seq=<last seq>`` of other random archived
  executions, each read once: a replay of the history archive.

Every response is checked: 200, the execution's event count, ``ETag`` = its
last acked seq, status ``COMPLETED``. p50 / p99 in milliseconds; the goal is
cold p99 <= 20 ms. Object bytes per archived event, the 1-minute load average
and this process's CPU time are reported too.

``--max-rate EVENTS_PER_S`` caps the offered load (a steady rate below what
the pipeline sustains); ``--publish-budget SECONDS`` stops publishing after that long (the JSON then
reports the events actually published and ``stopped_by_publish_budget``).

The single JSON result goes to stdout (and to ``--json-out``); progress goes
to stderr. ``up`` is stopped on exit (also on errors).

Usage: ``python bench/soak.py [--quick] [--events N] [--executions M] [--retention 20s] [--publish-budget S] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import nats.errors  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from bench.common import Proc, dist_version, nats_server_version  # noqa: E402
from bench.edge import latency_stats, percentile  # noqa: E402
from kernel.connect import close, connect  # noqa: E402
from kernel.host import consumer_stream  # noqa: E402
from kernel.producer import MSG_ID  # noqa: E402
from locator.envelope import encode_envelope, new_event, subject_for  # noqa: E402
from locator.ids import Snowflake  # noqa: E402
from locator.shard import shard_for  # noqa: E402
from locator.subjects import hist_bucket, proj_bucket, wal_stream  # noqa: E402
from system_playbooks.cleanup.plugin import RetentionPolicy  # noqa: E402

GOAL_P99_MS = 20.0
PLATEAU_GROWTH = 1.25  # second-half peak / first-half peak at or under this: plateaued
MIN_TOTAL_GROWTH = 1.5  # ... judged only if the events published grew at least this much between the halves
SHARDS = 4
TENANT = "soak"
FOLD_CONSUMERS = ("project", "materialize", "orchestrate")
OVERDUE_GRACE_S = 10.0
MIDDLE = (  # the events between execution.started and execution.completed, cycled
    ("step.enter", "fetch"), ("step.exit", "fetch"), ("step.enter", "transform"), ("user.progress", "transform"),
    ("step.exit", "transform"), ("step.enter", "load"), ("step.exit", "load"), ("user.summary", None),
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the up process


def _cli() -> str:
    found = Path(sys.executable).parent / "noetl-edge"
    return str(found) if found.exists() else shutil.which("noetl-edge") or "noetl-edge"


@dataclass
class Up:
    proc: Proc
    nats_url: str
    http_url: str
    data_dir: Path
    token: str

    def nats_pid(self) -> int | None:
        """up's nats-server child, found by name among its children in /proc."""
        pid = self.proc.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "nats-server":
                    return int(child)
        return None


@contextlib.contextmanager
def start_up(work: Path, retention: str) -> Iterator[Up]:
    data = work / "data"
    argv = [_cli(), "up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0", "--log-level", "warning"]
    proc = Proc("up", argv, work, env={"NOETL_HISTORY_RETENTION": retention})
    try:
        ready = proc.line(timeout=60).split()
        if len(ready) != 3 or ready[0] != "ready":
            raise RuntimeError(f"unexpected ready line from up: {ready}")
        yield Up(proc, ready[1], ready[2], data, (data / "token").read_text().strip())
    finally:
        proc.stop()


def rss_mb(pid: int | None, field_name: str = "VmRSS") -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root`` (0, 0 when it does not exist)."""
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).stat().st_size
                files += 1
    return total, files


# --------------------------------------------------------------------------- NATS state


async def stream_state(nc: NATS, stream: str) -> dict[str, Any]:
    """The server's own ``state`` of ``stream`` (nats-py's StreamState drops ``num_subjects``)."""
    msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=10)
    info = json.loads(msg.data)
    if "error" in info:
        raise RuntimeError(f"stream info {stream}: {info['error']}")
    state: dict[str, Any] = info["state"]
    return state


async def fold_lag(js: JetStreamContext, *, timeout: float = 60.0) -> int:
    """Events the kernel's folding consumers have not acked yet (waits for a consumer the kernel has not created yet)."""
    pending = 0
    for shard in range(SHARDS):
        for consumer in FOLD_CONSUMERS:
            name, deadline = f"{consumer}_{shard}", time.monotonic() + timeout
            while True:
                try:
                    info = await js.consumer_info(consumer_stream(consumer, shard), name)
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        stream = consumer_stream(consumer, shard)
                        raise RuntimeError(f"the kernel created no consumer {name} on {stream}") from None
                    await asyncio.sleep(0.2)
            pending += (info.num_pending or 0) + (info.num_ack_pending or 0)
    return pending


async def archived_count(js: JetStreamContext) -> int:
    """Rows of the shards' indexes of archived executions (their manifests: one KV key a shard)."""
    from projector.archiveindex import ArchiveIndex

    return sum([(await ArchiveIndex(js, s, None).manifest(newer_than=time.monotonic())).rows for s in range(SHARDS)])


@dataclass
class Series:
    """Samples over time, one list per figure."""

    names: tuple[str, ...] = (
        "published_events", "wal_messages", "wal_subjects", "wal_deleted", "wal_consumers", "proj_keys", "hist_keys", "archived",
        "nats_rss_mb", "up_rss_mb", "history_bytes", "history_files", "segment_bytes", "segment_files",
    )  # fmt: skip
    t: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    values: dict[str, list[Any]] = field(default_factory=dict)
    wal_messages_per_stream: list[list[int]] = field(default_factory=list)
    wal_subjects_per_stream: list[list[int]] = field(default_factory=list)

    def add(self, t: float, phase: str, row: dict[str, Any], per_stream: tuple[list[int], list[int]]) -> None:
        self.t.append(round(t, 1))
        self.phase.append(phase)
        for name in self.names:
            self.values.setdefault(name, []).append(row[name])
        self.wal_messages_per_stream.append(per_stream[0])
        self.wal_subjects_per_stream.append(per_stream[1])


class Sampler:
    def __init__(self, nc: NATS, up: Up, t0: float) -> None:
        self.nc = nc
        self.up = up
        self.t0 = t0
        self.phase = "publish"
        self.published = 0
        self.series = Series()
        self.nats_pid = up.nats_pid()
        self.missed = 0

    async def sample(self, *, verbose: bool = False) -> dict[str, Any] | None:
        """One row of every figure (None, and counted, when nats-server did not answer in time)."""
        try:
            wal = [await stream_state(self.nc, wal_stream(s)) for s in range(SHARDS)]
            proj = [await stream_state(self.nc, f"KV_{proj_bucket(s)}") for s in range(SHARDS)]
            hist = [await stream_state(self.nc, f"KV_{hist_bucket(s)}") for s in range(SHARDS)]
        except nats.errors.TimeoutError:
            self.missed += 1
            log(f"t={time.monotonic() - self.t0:7.1f}s: nats-server did not answer stream info in time; sample skipped")
            return None
        objects = self.up.data_dir / "objects"
        history_bytes, history_files = await asyncio.to_thread(tree_size, objects / "history")
        segment_bytes, segment_files = await asyncio.to_thread(tree_size, objects / "segments")
        row: dict[str, Any] = {
            "published_events": self.published,
            "wal_messages": sum(int(w["messages"]) for w in wal),
            "wal_subjects": sum(int(w.get("num_subjects", 0)) for w in wal),
            "wal_deleted": sum(int(w.get("num_deleted", 0)) for w in wal),
            "wal_consumers": sum(int(w.get("consumer_count", 0)) for w in wal),
            "proj_keys": sum(int(p.get("num_subjects", 0)) for p in proj),
            "hist_keys": sum(int(h.get("num_subjects", 0)) for h in hist),
            "archived": await archived_count(self.nc.jetstream()),
            "nats_rss_mb": rss_mb(self.nats_pid),
            "up_rss_mb": rss_mb(self.up.proc.proc.pid),
            "history_bytes": history_bytes,
            "history_files": history_files,
            "segment_bytes": segment_bytes,
            "segment_files": segment_files,
        }
        per_stream = ([int(w["messages"]) for w in wal], [int(w.get("num_subjects", 0)) for w in wal])
        self.series.add(time.monotonic() - self.t0, self.phase, row, per_stream)
        if verbose:
            log(f"t={time.monotonic() - self.t0:7.1f}s {self.phase}: published {row['published_events']:,}, "
                f"WAL {row['wal_messages']:,} msgs / {row['wal_subjects']:,} subjects / {row['wal_deleted']:,} deleted / "
                f"{row['wal_consumers']:,} consumers, "
                f"proj {row['proj_keys']:,}, hist {row['hist_keys']:,}, nats {row['nats_rss_mb']} MB, "
                f"history {row['history_bytes'] / 1e6:.1f} MB")  # fmt: skip
        return row

    async def loop(self, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample(verbose=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


def plateau(series: Series) -> dict[str, dict[str, Any]]:
    """Per figure: peak, last, last / peak, and its peak over the second half of the events published over its
    peak over the first half (halves of the events, not of the time: a publisher held back late changes nothing).

    >>> s = Series()
    >>> for i, (phase, published) in enumerate([("publish", 100), ("publish", 500), ("publish", 900), ("drain", 1000)]):
    ...     row = dict.fromkeys(Series.names, 0) | {"published_events": published, "wal_messages": published // 10}
    ...     s.add(float(i), phase, row, ([], []))
    >>> plateau(s)["wal_messages"]
    {'peak': 100, 'last': 100, 'last_over_peak': 1.0, 'growth': 1.8, 'plateaued': False}
    """
    published = series.values.get("published_events", [])
    total = max((v for v in published if v is not None), default=0)
    half = [p is not None and p <= total / 2 for p in published]  # sample i was taken in the first half
    early = [v for v, ph, h in zip(published, series.phase, half) if ph == "publish" and h and v is not None]
    late = [v for v, ph, h in zip(published, series.phase, half) if ph == "publish" and not h and v is not None]
    # A verdict needs the total to have grown meanwhile: a stalled publisher makes anything look flat.
    total_grew = bool(early and late and max(early) > 0 and max(late) / max(early) >= MIN_TOTAL_GROWTH)
    out: dict[str, dict[str, Any]] = {}
    for name in series.names:
        if name == "published_events":
            continue
        values = series.values.get(name, [])
        pairs = [(h, v) for h, ph, v in zip(half, series.phase, values) if ph == "publish" and v is not None]
        all_values = [v for v in values if v is not None]
        if not all_values:
            continue
        peak, last = max(all_values), all_values[-1]
        first = [v for h, v in pairs if h]
        second = [v for h, v in pairs if not h]
        growth = round(max(second) / max(first), 3) if first and second and max(first) > 0 else None
        out[name] = {
            "peak": peak,
            "last": last,
            "last_over_peak": round(last / peak, 3) if peak else None,
            "growth": growth,
            # None: too few samples while publishing, or the published total grew too little to tell
            "plateaued": None if growth is None or not total_grew else growth <= PLATEAU_GROWTH,
        }
    return out


# --------------------------------------------------------------------------- publishing


def projects() -> list[str]:
    """One project per shard of the default topology."""
    by_shard: dict[int, str] = {}
    for i in range(1000):
        by_shard.setdefault(shard_for(TENANT, f"p{i}", "", SHARDS), f"p{i}")
        if len(by_shard) == SHARDS:
            return [by_shard[s] for s in range(SHARDS)]
    raise RuntimeError("no project for every shard")


def event_shape(k: int, per: int, ordinal: int) -> tuple[str, str | None, int | None, dict[str, Any]]:
    """(type, step, attempt, payload) of event ``k`` of an execution's ``per`` events."""
    if k == 0:
        return "execution.started", None, None, {"workload": {"ordinal": ordinal}}
    if k == per - 1:
        return "execution.completed", None, None, {"rows": ordinal % 1000}
    kind, step = MIDDLE[(k - 1) % len(MIDDLE)]
    attempt = 1 if kind.startswith("step.") else None
    payload: dict[str, Any] = {"rows": ordinal % 1000, "ok": True} if kind == "step.exit" else {"k": k}
    return kind, step, attempt, payload


@dataclass
class Executions:
    """Who was published: ids, projects and the last acked seq of each execution."""

    ids: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)
    last_seq: list[int] = field(default_factory=list)
    completed_at: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, executions completed so far)


async def publish_window(
    js: JetStreamContext, ids: Sequence[str], project_of: Sequence[str], per: int, first_ordinal: int
) -> list[int]:
    """Each execution's ``per`` events, interleaved across the window; the last acked seq of each."""
    futures: list[tuple[int, asyncio.Future[Any]]] = []
    for k in range(per):
        for i, execution_id in enumerate(ids):
            kind, step, attempt, payload = event_shape(k, per, first_ordinal + i)
            env = new_event(tenant=TENANT, project=project_of[i], execution_id=execution_id, type=kind, step=step,
                            attempt=attempt, payload=payload)  # fmt: skip
            fut = await js.publish_async(subject_for(env, SHARDS), encode_envelope(env), headers={MSG_ID: env.event_id})
            futures.append((i, fut))
    last = [0] * len(ids)
    acks = await asyncio.gather(*(f for _, f in futures))
    for (i, _), ack in zip(futures, acks):
        if ack.duplicate or not ack.seq:
            raise RuntimeError(f"publish of {ids[i]}: not a fresh ack: {ack!r}")
        last[i] = max(last[i], ack.seq)
    return last


@dataclass
class Held:
    fold_lag_s: float = 0.0
    archive_overdue_s: float = 0.0
    nats_busy_s: float = 0.0
    nats_timeouts: int = 0
    max_fold_lag_seen: int = 0
    max_overdue_seen: int = 0


async def hold_back(js: JetStreamContext, nc: NATS, ex: Executions, args: argparse.Namespace, held: Held, up: Up) -> None:
    """Wait while the folding consumers lag or the archive is behind the retention (see the module docstring)."""
    due_after = args.retention_s + RetentionPolicy(seconds=args.retention_s).slack + OVERDUE_GRACE_S
    while True:
        up.proc.check()
        t = time.monotonic()
        try:
            lag = await fold_lag(js)
            due = max((n for at, n in ex.completed_at if at + due_after <= t), default=0)
            overdue = due - await archived_count(js) if due else 0
        except nats.errors.TimeoutError:
            # nats-server too busy to answer within the timeout: that is a reason to hold back too.
            held.nats_timeouts += 1
            await asyncio.sleep(1.0)
            held.nats_busy_s += time.monotonic() - t
            continue
        held.max_fold_lag_seen = max(held.max_fold_lag_seen, lag)
        if lag > args.max_lag:
            await asyncio.sleep(0.2)
            held.fold_lag_s += time.monotonic() - t
            continue
        held.max_overdue_seen = max(held.max_overdue_seen, overdue)
        if overdue > args.max_overdue:
            await asyncio.sleep(0.5)
            held.archive_overdue_s += time.monotonic() - t
            continue
        return


# --------------------------------------------------------------------------- reads


@dataclass
class Target:
    name: str
    url: str
    source: str | None
    last_seq: int
    events: int
    status: str


async def get_checked(client: httpx.AsyncClient, target: Target) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = await client.get(target.url)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{target.name} GET {target.url}: {r.status_code} {r.text[:300]}")
    source = r.headers.get("x-noetl-source", "")
    if target.events:
        body = r.json()
        got = (body["event_count"], body["status"], r.headers.get("etag"))
        if got != (target.events, target.status, f'"{target.last_seq}"'):
            raise RuntimeError(f"{target.name} GET {target.url}: (event_count, status, ETag) {got}, expected "
                               f"{(target.events, target.status, target.last_seq)}")  # fmt: skip
        if target.source is not None and source != target.source:
            raise RuntimeError(f"{target.name} GET {target.url}: X-Noetl-Source {source}, expected {target.source}")
    return ms, source


async def warm_target(js: JetStreamContext, client: httpx.AsyncClient, project: str) -> Target:
    """A 4-event execution that never ends: its projection stays inline in KV; waited for until folded."""
    execution_id = Snowflake(node_id=1).next_str()
    envs = [
        new_event(tenant=TENANT, project=project, execution_id=execution_id, type="execution.started"),
        new_event(tenant=TENANT, project=project, execution_id=execution_id, type="step.enter", step="fetch", attempt=1),
        new_event(tenant=TENANT, project=project, execution_id=execution_id, type="step.exit", step="fetch", attempt=1,
                  payload={"rows": 3}),
        new_event(tenant=TENANT, project=project, execution_id=execution_id, type="user.note", payload={"hello": "world"}),
    ]  # fmt: skip
    last = 0
    for env in envs:
        ack = await js.publish(subject_for(env, SHARDS), encode_envelope(env), headers={MSG_ID: env.event_id})
        last = ack.seq
    target = Target("warm", f"/api/v1/tenants/{TENANT}/projects/{project}/executions/{execution_id}", "cache", last, 4,
                    "RUNNING")  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        r = await client.get(target.url)
        if r.status_code == 200 and r.headers.get("x-noetl-source") == "cache" and r.headers.get("etag") == f'"{last}"':
            return target
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm execution not folded into KV: {r.status_code} {dict(r.headers)}")
        await asyncio.sleep(0.1)


async def read_phase(
    js: JetStreamContext, up: Up, ex: Executions, per: int, archived: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {up.token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    n, rounds = args.latency_samples, args.rounds
    picked = random.Random(15).sample(list(archived), min(len(archived), 2 * n * rounds))
    cold_pool, as_of_pool = picked[: len(picked) // 2], picked[len(picked) // 2 :]
    if len(cold_pool) < rounds or len(as_of_pool) < rounds:
        raise RuntimeError(f"only {len(archived)} archived executions to read: too few for {rounds} rounds")
    per_round = min(n, len(cold_pool) // rounds, len(as_of_pool) // rounds)

    def url(i: int) -> str:
        return f"/api/v1/tenants/{TENANT}/projects/{ex.projects[i]}/executions/{ex.ids[i]}"

    samples: dict[str, list[list[float]]] = {k: [] for k in ("baseline_trivial", "warm", "cold", "as_of_seq")}
    sources: dict[str, dict[str, int]] = {"cold": {}, "as_of_seq": {}}
    async with httpx.AsyncClient(base_url=up.http_url, headers=headers, limits=limits, timeout=30.0) as client:
        warm = await warm_target(js, client, ex.projects[0])
        trivial = Target("baseline_trivial", "/healthz", None, 0, 0, "")
        for _ in range(args.warmup):  # uncounted: connections, imports, first-use caches
            await get_checked(client, trivial)
            await get_checked(client, warm)
        for r in range(rounds):
            cold = [Target("cold", url(i), None, ex.last_seq[i], per, "COMPLETED") for i in cold_pool[r * per_round : (r + 1) * per_round]]
            as_of = [
                Target("as_of_seq", f"{url(i)}?as_of_seq={ex.last_seq[i]}", "replay", ex.last_seq[i], per, "COMPLETED")
                for i in as_of_pool[r * per_round : (r + 1) * per_round]
            ]
            plan: list[tuple[str, list[Target]]] = [
                ("baseline_trivial", [trivial] * per_round), ("warm", [warm] * per_round), ("cold", cold), ("as_of_seq", as_of),
            ]  # fmt: skip
            if r % 2:
                plan.reverse()
            got: dict[str, list[float]] = {}
            for name, targets in plan:
                got[name] = []
                for target in targets:
                    ms, source = await get_checked(client, target)
                    got[name].append(ms)
                    if name in sources:
                        sources[name][source] = sources[name].get(source, 0) + 1
                samples[name].append(got[name])
            log(f"read round {r + 1}/{rounds}: " + ", ".join(f"{k} p50 {percentile(v, 50):.2f} ms" for k, v in got.items()))
    latency = {name: latency_stats(rounds_) for name, rounds_ in samples.items()}
    return {
        "latency_ms": latency,
        "sources": sources,
        "reads_per_round": per_round,
        "rounds": rounds,
        "goal_cold_p99_ms": GOAL_P99_MS,
        "meets_goal": latency["cold"]["p99"] <= GOAL_P99_MS,
        "cold_p99_over_warm_p99": round(latency["cold"]["p99"] / latency["warm"]["p99"], 2),
    }


# --------------------------------------------------------------------------- main


async def run(up: Up, args: argparse.Namespace) -> dict[str, Any]:
    nc = await connect([up.nats_url], name="bench-soak")
    try:
        js = nc.jetstream()
        t0 = time.monotonic()
        sampler = Sampler(nc, up, t0)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.loop(args.sample_every, stop))
        per = args.events // args.executions
        names = projects()
        ids = Snowflake(node_id=2)
        ex = Executions()
        held = Held()
        load = [round(os.getloadavg()[0], 2)]
        cpu0 = time.process_time()
        log(f"publishing {args.events:,} events over {args.executions:,} executions ({per} each), "
            f"retention {args.retention}, {args.window} executions per window")  # fmt: skip
        budget_hit = False
        for start in range(0, args.executions, args.window):
            if args.publish_budget and time.monotonic() - t0 >= args.publish_budget:
                budget_hit = True  # reported: the run publishes fewer events than asked for
                log(f"publish budget of {args.publish_budget:g}s spent after {len(ex.ids):,} executions")
                break
            await hold_back(js, nc, ex, args, held, up)
            count = min(args.window, args.executions - start)
            if args.max_rate:  # a steady offered load, never ahead of --max-rate events/s on average
                ahead = len(ex.ids) * per / args.max_rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            window_ids = [ids.next_str() for _ in range(count)]
            window_projects = [names[(start + i) % len(names)] for i in range(count)]
            last = await publish_window(js, window_ids, window_projects, per, start)
            ex.ids += window_ids
            ex.projects += window_projects
            ex.last_seq += last
            ex.completed_at.append((time.monotonic(), len(ex.ids)))
            sampler.published = len(ex.ids) * per
        publish_s = time.monotonic() - t0
        publish_cpu = time.process_time() - cpu0
        executions = len(ex.ids)
        events = executions * per
        load.append(round(os.getloadavg()[0], 2))
        log(f"published {events:,} events in {publish_s:.1f}s ({events / publish_s:,.0f} events/s); waiting for the archive")
        stop.set()
        await sampling
        sampler.phase = "drain"
        t_drain = time.monotonic()
        drained = False
        final: dict[str, Any] | None = None
        while True:
            up.proc.check()
            row = await sampler.sample(verbose=True)
            if row is not None:
                final = row
                if row["archived"] >= executions and row["wal_messages"] == 0:
                    drained = True
                    break
            if time.monotonic() - t_drain >= args.drain_timeout:
                break
            await asyncio.sleep(min(args.sample_every, 2.0))
        drain_s = time.monotonic() - t_drain
        if final is None:
            raise RuntimeError(f"nats-server answered no stream info for {drain_s:.0f}s after publishing")
        leftover = await proj_leftover(js, up.data_dir / "objects") if final["proj_keys"] else []
        if leftover:
            log(f"{final['proj_keys']} KV projection entries left after archiving, e.g. {leftover[:3]}")
        # Which executions the archive holds (all of them once drained), each with its published event count.
        archived = await archived_ordinals(js, up.data_dir / "objects", ex, per, drained)
        log(f"archive {'caught up' if drained else 'did NOT catch up'} in {drain_s:.1f}s; "
            f"{len(archived):,} archived executions checked; reading")  # fmt: skip
        reads = await read_phase(js, up, ex, per, archived, args)
        load.append(round(os.getloadavg()[0], 2))
    finally:
        await close(nc)
    archived_events = final["archived"] * per
    out: dict[str, Any] = {
        "bench": "soak",
        "events": events,
        "executions": executions,
        "events_per_execution": per,
        "events_requested": args.events,
        "publish_budget_s": args.publish_budget or None,
        "stopped_by_publish_budget": budget_hit,
        "retention": args.retention,
        "publish": {
            "seconds": round(publish_s, 1),
            "events_per_s": round(events / publish_s),
            "executions_per_s": round(executions / publish_s),
            "window_executions": args.window,
            "held_back_s": {"fold_lag": round(held.fold_lag_s, 1), "archive_overdue": round(held.archive_overdue_s, 1),
                            "nats_busy": round(held.nats_busy_s, 1)},
            "nats_request_timeouts": held.nats_timeouts,
            "max_rate": args.max_rate or None,
            "max_lag": args.max_lag,
            "max_overdue": args.max_overdue,
            "max_fold_lag_seen": held.max_fold_lag_seen,
            "max_overdue_seen": held.max_overdue_seen,
            "bench_cpu_us_per_event": round(publish_cpu * 1e6 / events, 1),
        },
        "drain": {"seconds": round(drain_s, 1), "drained": drained, "timeout_s": args.drain_timeout},
        "samples_missed": sampler.missed,
        "final": final,
        "proj_leftover": leftover,
        "objects": {
            "archived_events": archived_events,
            "history_bytes": final["history_bytes"],
            "history_files": final["history_files"],
            "history_bytes_per_archived_event": round(final["history_bytes"] / archived_events, 1) if archived_events else None,
            "segment_bytes": final["segment_bytes"],
            "segment_files": final["segment_files"],
            "segment_bytes_per_execution": round(final["segment_bytes"] / executions, 1),
        },
        "nats_vmhwm_mb": rss_mb(up.nats_pid(), "VmHWM"),
        "reads": reads,
        "loadavg_1m": load,
        "cpus": os.cpu_count(),
    }
    summary = plateau(sampler.series)
    out["plateau"] = summary
    out["plateaued"] = sorted(k for k, v in summary.items() if v["plateaued"] is True)
    out["grew"] = sorted(k for k, v in summary.items() if v["plateaued"] is False)
    out["undetermined"] = sorted(k for k, v in summary.items() if v["plateaued"] is None)
    s = sampler.series
    out["series"] = {"t": s.t, "phase": s.phase, **s.values, "wal_messages_per_stream": s.wal_messages_per_stream,
                     "wal_subjects_per_stream": s.wal_subjects_per_stream}  # fmt: skip
    return out


async def proj_leftover(js: JetStreamContext, objects: Path, limit: int = 20) -> list[dict[str, Any]]:
    """KV projection entries still there after archiving (there should be none): each beside its index row."""
    from projector.archive import ArchiveIndex
    from projector.objects import ObjectRoot

    root = ObjectRoot(f"file://{objects.absolute()}")
    out: list[dict[str, Any]] = []
    for shard in range(SHARDS):
        kv = await js.key_value(proj_bucket(shard))
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            continue
        index = ArchiveIndex(js, shard, root)
        for key in keys[: limit - len(out)]:
            msg = await js.get_last_msg(f"KV_{proj_bucket(shard)}", f"$KV.{proj_bucket(shard)}.{key}")
            entry = json.loads(msg.data or b"{}")
            row = await index.get_row(key)
            out.append({"shard": shard, "execution_id": key, "entry_last_seq": entry.get("last_seq"),
                        "entry_kind": "pointer" if "pointer" in entry else "inline", "entry_seq": msg.seq,
                        "entry_at": msg.time.isoformat() if msg.time else None,
                        "archived_last_seq": None if row is None else row.last_seq,
                        "archived_at": None if row is None else row.ref.archived_at})  # fmt: skip
    return out


async def archived_ordinals(js: JetStreamContext, objects: Path, ex: Executions, per: int, drained: bool) -> list[int]:
    """The ordinals of archived executions; each checked: its ref holds all ``per`` events up to its last acked seq."""
    from projector.archive import ArchiveIndex
    from projector.objects import ObjectRoot

    root = ObjectRoot(f"file://{objects.absolute()}")
    indexes = {p: ArchiveIndex(js, shard_for(TENANT, p, "", SHARDS), root) for p in set(ex.projects)}
    # Once drained every execution is archived: check a random sample of them (a full check is M round trips).
    candidates = random.Random(16).sample(range(len(ex.ids)), min(len(ex.ids), 2000)) if drained else range(len(ex.ids))
    out: list[int] = []
    for i in candidates:
        ref, _ = await indexes[ex.projects[i]].get(ex.ids[i])
        if ref is None:
            if drained:
                raise RuntimeError(f"execution {ex.ids[i]} has no archive ref although the indexes hold every execution")
            continue
        if (ref.count, ref.last_seq) != (per, ex.last_seq[i]):
            raise RuntimeError(f"archive ref of {ex.ids[i]}: (count, last_seq) {(ref.count, ref.last_seq)}, "
                               f"expected {(per, ex.last_seq[i])}")  # fmt: skip
        out.append(i)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak noetl-edge up with a short history retention: publish N events over M executions at the "
        "rate the pipeline sustains, sample WAL, KV, nats-server memory and objects over time, then time cold "
        "GETs of archived executions beside a warm GET and a trivial endpoint. Prints one JSON object.",
    )
    p.add_argument("--events", type=int, default=1_000_000, help="events to publish (default 1000000)")
    p.add_argument("--executions", type=int, default=100_000, help="executions they belong to (default 100000)")
    p.add_argument("--retention", default="20s", help="NOETL_HISTORY_RETENTION for up (default 20s)")
    p.add_argument("--window", type=int, default=500, help="executions published together, interleaved (default 500)")
    p.add_argument("--max-lag", type=int, default=30_000, help="hold publishing while the fold consumers lag more (default 30000)")
    p.add_argument("--max-overdue", type=int, default=5_000,
                   help="hold publishing while more executions are overdue for archiving (default 5000)")  # fmt: skip
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--drain-timeout", type=float, default=900.0, help="longest wait for the archive to catch up (default 900)")
    p.add_argument("--latency-samples", type=int, default=100, help="GETs per kind and round (default 100)")
    p.add_argument("--rounds", type=int, default=5, help="read rounds (default 5)")
    p.add_argument("--warmup", type=int, default=20, help="uncounted trivial and warm GETs first (default 20)")
    p.add_argument("--max-rate", type=float, default=0.0,
                   help="publish at most this many events/s on average (0: as fast as the pipeline keeps up)")  # fmt: skip
    p.add_argument("--publish-budget", type=float, default=0.0,
                   help="stop publishing after this many seconds (0: no limit); the JSON then says how many were published")  # fmt: skip
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (for tests): 2000 events over 200 executions, retention 2s, 2 rounds of 10 reads")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.executions, args.retention, args.window = 2000, 200, "2s", 50
        args.sample_every, args.latency_samples, args.rounds, args.warmup, args.drain_timeout = 1.0, 10, 2, 5, 120.0
    if args.executions < 1 or args.events < 2 * args.executions or args.events % args.executions:
        p.error("--events must be a multiple of --executions with at least 2 events per execution")
    try:
        retention_s = RetentionPolicy.parse(args.retention).seconds
    except Exception as e:  # PluginError: its message names the accepted forms
        p.error(f"--retention: {e}")
    if retention_s is None:
        p.error("--retention must be a duration (e.g. 20s): 'off' archives nothing")
    args.retention_s = retention_s
    if min(args.window, args.max_lag, args.max_overdue, args.latency_samples, args.rounds) < 1 or args.warmup < 0:
        p.error("--window, --max-lag, --max-overdue, --latency-samples and --rounds must be >= 1, --warmup >= 0")
    if args.sample_every <= 0 or args.drain_timeout <= 0 or min(args.publish_budget, args.max_rate) < 0:
        p.error("--sample-every and --drain-timeout must be > 0, --publish-budget and --max-rate >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM must stop up too (a background job's SIGINT is ignored): unwind through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from kernel.logs import configure_logging

    configure_logging(level="warning")
    with tempfile.TemporaryDirectory(prefix="noetl-bench-soak-") as work, start_up(Path(work), args.retention) as up:
        log(f"up: NATS {up.nats_url}, HTTP {up.http_url}, nats-server pid {up.nats_pid()}")
        result = asyncio.run(run(up, args))
    result["quick"] = args.quick
    result["versions"] = {"nats_server": nats_server_version(), "nats_py": dist_version("nats-py"),
                          "python": platform.python_version()}  # fmt: skip
    text = json.dumps(result)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
