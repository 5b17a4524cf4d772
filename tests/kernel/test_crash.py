"""Acceptance: real ``noetl-edge kernel`` processes SIGKILLed mid-fold, and two kernels failing over.

Both tests run the installed console script against a real nats-server
bootstrapped with a 2 s lease TTL (the kernels get ``NOETL_LEASE_TTL=2`` so
they agree with the bucket; ``NOETL_TEST_KERNEL_LOG_LEVEL=info`` makes their
logs, shown on failure, more talkative), and check the core invariant of
``ARCHITECTURE.md``: for every execution the served projection (KV inline or
the Feather row a KV pointer names) equals a fresh fold of its WAL history,
byte for byte after canonical encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kernel.bootstrap import StreamSettings, bootstrap
from kernel.host import consumer_stream
from kernel.leases import lease_holder
from kernel.producer import Ack, Producer
from natscluster.server import EmbeddedServer
from locator import Envelope, Snowflake, new_event, shard_for
from locator.subjects import LEASES_BUCKET
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.projection import TERMINAL, canonical
from projector.replay import newest_snapshot, replay
from projector.snapshots import SnapshotStore

pytestmark = pytest.mark.slow

SHARDS = 4
TTL = 2.0  # lease TTL of the bucket and of every kernel (NOETL_LEASE_TTL)
INTERVAL = TTL / 3  # ShardLeases' default tick
# Acceptance bound for a survivor to take over a SIGKILLed kernel's shards: the dead holder's keys
# age out at most TTL after its last renewal (sent before the kill), the survivor notices on its next
# tick (INTERVAL), plus slack for the server's expiry timer and a loaded 2-core machine.
TAKEOVER_SLACK = 1.5
TAKEOVER_BOUND = TTL + INTERVAL + TAKEOVER_SLACK

# Tenant/project pairs spread over all four shards (FNV-1a % 4): 0, 1, 2, 3, 0, 1, 2, 3.
LOCATIONS = [
    ("globex", "web"), ("acme", "ops"), ("acme", "etl"), ("acme", "web"),
    ("initech", "etl"), ("initech", "web"), ("globex", "ops"), ("hooli", "ml"),
]  # fmt: skip


# --------------------------------------------------------------------------- workload


@dataclass
class Execution:
    execution_id: str
    tenant: str
    project: str
    events: list[Envelope] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # event_id -> WAL seq

    @property
    def shard(self) -> int:
        return shard_for(self.tenant, self.project, "", SHARDS)

    @property
    def last_seq(self) -> int:
        return max(self.acked.values())


def _step_block(rng: random.Random, e: Execution, step: str) -> list[Envelope]:
    """One step: enter/issue (sometimes claimed), maybe a failed attempt or two with retry, then exit."""
    kw: dict[str, Any] = {"tenant": e.tenant, "project": e.project, "execution_id": e.execution_id}
    out: list[Envelope] = []
    attempts = 1 + (rng.random() < 0.25) + (rng.random() < 0.1)
    for attempt in range(1, attempts + 1):
        out.append(new_event(**kw, type="step.enter", step=step, attempt=attempt))
        out.append(new_event(**kw, type="command.issued", step=step, attempt=attempt, payload={"pool": "default"}))
        if rng.random() < 0.3:
            out.append(new_event(**kw, type="command.claimed", step=step, attempt=attempt, payload={"worker": "w1"}))
        if attempt < attempts:
            out.append(new_event(**kw, type="call.error", step=step, attempt=attempt, payload={"error": {"kind": "timeout"}}))
            out.append(new_event(**kw, type="step.retry", step=step, attempt=attempt, payload={"delay_s": 1}))
    if rng.random() < 0.2:
        out.append(new_event(**kw, type=f"user.progress_{rng.randrange(3)}", step=step, payload={"pct": rng.randrange(100)}))
    out.append(
        new_event(**kw, type="step.exit", step=step, attempt=attempts, payload={"result": {"rows": rng.randrange(10_000)}})
    )
    return out


def make_executions(rng: random.Random, count: int, total_events: int, *, node_id: int) -> list[Execution]:
    """``count`` executions with ``total_events`` events between them (a realistic mix, lengths varied)."""
    ids = Snowflake(node_id=node_id)
    mean = total_events // count
    assert mean * count == total_events and count % 2 == 0 and mean >= 12
    spread = [rng.randrange(0, mean // 2) for _ in range(count // 2)]
    lengths = [mean + d for d in spread] + [mean - d for d in spread]
    rng.shuffle(lengths)
    out: list[Execution] = []
    for i, length in enumerate(lengths):
        tenant, project = LOCATIONS[i % len(LOCATIONS)]
        e = Execution(ids.next_str(), tenant, project)
        kw: dict[str, Any] = {"tenant": tenant, "project": project, "execution_id": e.execution_id}
        head = [
            new_event(
                **kw,
                type="execution.requested",
                # No playbook: these histories come from an outside producer, so the orchestrator leaves them be
                # and every event in the WAL is one this test published.
                payload={"playbook": None, "workload": {"n": i, "job": f"etl/job_{i % 7}"}},
            ),
            new_event(**kw, type="execution.started"),
        ]
        ending = rng.random()
        if ending < 0.65:
            tail = [new_event(**kw, type="execution.completed", payload={"ok": True})]
        elif ending < 0.85:
            error = {"kind": "http", "status": 500}
            tail = [
                new_event(**kw, type="call.error", step="last", attempt=3, payload={"error": error}),
                new_event(**kw, type="step.failed", step="last", attempt=3, payload={"error": error}),
                new_event(**kw, type="execution.failed", payload={"error": {"step": "last", "why": "boom"}}),
            ]
        else:  # still running when the test looks
            tail = [new_event(**kw, type="user.heartbeat")]
        body: list[Envelope] = []
        step = 0
        while len(body) < length - len(head) - len(tail):
            if rng.random() < 0.1:
                body.append(new_event(**kw, type="user.note", payload={"text": f"note {len(body)}"}))
            body += _step_block(rng, e, f"s{step}")
            step += 1
        e.events = head + body[: length - len(head) - len(tail)] + tail
        assert len(e.events) == length
        out.append(e)
    return out


def interleave(rng: random.Random, executions: Sequence[Execution]) -> list[Envelope]:
    """All events in one publish order: executions start at staggered times, each keeps its own order."""
    keyed: list[tuple[float, int, int, Envelope]] = []
    for i, e in enumerate(executions):
        start, duration = rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.4)
        n = len(e.events)
        keyed += [(start + duration * j / n, i, j, ev) for j, ev in enumerate(e.events)]
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


def chunked(events: Sequence[Envelope], size: int) -> list[list[Envelope]]:
    return [list(events[i : i + size]) for i in range(0, len(events), size)]


def add_duplicates(rng: random.Random, chunks: list[list[Envelope]], how_many: int) -> set[str]:
    """Re-publish ``how_many`` already-sent events (same event_id) in later chunks, or later in their own chunk."""
    dup_ids: set[str] = set()
    while len(dup_ids) < how_many:
        src = rng.randrange(len(chunks) - 1)
        original = rng.choice(chunks[src])
        if original.event_id in dup_ids:
            continue
        dup_ids.add(original.event_id)
        if rng.random() < 0.2:
            chunks[src].append(original)  # a duplicate inside the same pipelined batch
        else:
            target = chunks[rng.randrange(src + 1, len(chunks))]
            target.insert(rng.randrange(len(target) + 1), original)
    return dup_ids


class Publisher:
    """Publishes chunks with ``Producer.publish_many`` and books every ack on its execution."""

    def __init__(self, js: JetStreamContext, topology: Topology, executions: Sequence[Execution]) -> None:
        self.producer = Producer(js, topology)
        self.by_id = {e.execution_id: e for e in executions}
        self.published = 0
        self.duplicate_acks: list[Ack] = []

    async def publish(self, chunk: Sequence[Envelope]) -> None:
        results = await self.producer.publish_many(chunk)
        for env, result in zip(chunk, results, strict=True):
            assert isinstance(result, Ack), f"event {env.event_id} was not written: {result}"
            acked = self.by_id[env.execution_id].acked
            if result.duplicate:
                assert acked.get(env.event_id) == result.seq, f"duplicate {env.event_id} acked at another seq"
                self.duplicate_acks.append(result)
            else:
                assert env.event_id not in acked, f"{env.event_id} was stored twice: {acked[env.event_id]}, {result.seq}"
                acked[env.event_id] = result.seq
        self.published += len(chunk)

    async def publish_paced(
        self, chunks: Sequence[Sequence[Envelope]], pause: float, hold_last: asyncio.Event | None = None
    ) -> None:
        """Publish chunk by chunk; with ``hold_last``, the last chunk waits for it (so kills land mid-stream)."""
        for i, chunk in enumerate(chunks):
            if hold_last is not None and i == len(chunks) - 1:
                await hold_last.wait()
            await self.publish(chunk)
            await asyncio.sleep(pause)


# --------------------------------------------------------------------------- processes


class KernelProcess:
    """One ``noetl-edge kernel`` subprocess; stderr (its logs) goes to a file for failure reports."""

    def __init__(self, command: list[str], env: dict[str, str], *, url: str, holder: str, data_dir: Path, logs: Path) -> None:
        self.holder = holder
        self.log_path = logs / f"kernel-{holder}.stderr"
        self.args = [
            *command, "kernel", "--nats-url", url, "--shards", str(SHARDS), "--holder", holder, "--data-dir", str(data_dir),
        ]  # fmt: skip
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.killed = False

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "w", encoding="utf-8") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=err, env=self.env, text=True)
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"kernel {self.holder} did not get ready in {timeout}s:\n{self.stderr()}") from None
        assert line.startswith(f"ready kernel {self.holder} "), f"kernel {self.holder} said {line!r}:\n{self.stderr()}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (no clean release of anything), reap, close the pipe; safe to call twice."""
        if self.proc is None:
            return
        self.killed = True
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stderr(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no stderr file)"
        tail = text.splitlines()[-lines:]
        return f"--- {self.log_path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail)


def kernel_env(environ: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if not k.startswith("NOETL_")}
    env.update(NOETL_LEASE_TTL=str(int(TTL)), NOETL_LOG_LEVEL=os.environ.get("NOETL_TEST_KERNEL_LOG_LEVEL", "warning"))
    return env


def report(kernels: Sequence[KernelProcess]) -> str:
    return "\n".join(k.stderr() for k in kernels)


# --------------------------------------------------------------------------- checks


async def holders(leases: KeyValue) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for shard in range(SHARDS):
        value = await lease_holder(leases, shard)
        out[shard] = None if value is None else value.holder
    return out


async def wait_for(
    what: str, check: Any, timeout: float, kernels: Sequence[KernelProcess], every: float = 0.1, describe: Any = None
) -> Any:
    """Poll the async ``check`` until it returns something truthy; fail with the kernels' logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        for k in kernels:
            assert k.alive() or k.killed, f"kernel {k.holder} exited:\n{k.stderr()}"
        await asyncio.sleep(every)
    detail = await describe() if describe is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}) {detail}\n{report(kernels)}")


async def caches(js: JetStreamContext) -> dict[int, KvProjectionCache]:
    return {shard: await KvProjectionCache.open(js, shard) for shard in range(SHARDS)}


async def lagging(cache_by_shard: dict[int, KvProjectionCache], executions: Sequence[Execution]) -> list[str]:
    """Executions whose cache entry is not (yet) at the last WAL seq of their history."""
    behind: list[str] = []
    for e in executions:
        entry = await cache_by_shard[e.shard].get(e.execution_id)
        if entry is None or entry.last_seq != e.last_seq:
            assert entry is None or entry.last_seq < e.last_seq, f"{e.execution_id} folded past its WAL: {entry}"
            behind.append(e.execution_id)
    return behind


async def describe_lag(js: JetStreamContext, executions: Sequence[Execution]) -> str:
    cache_by_shard = await caches(js)
    behind = []
    for e in executions:
        entry = await cache_by_shard[e.shard].get(e.execution_id)
        if entry is None or entry.last_seq != e.last_seq:
            behind.append((e.execution_id, e.shard, None if entry is None else entry.last_seq, e.last_seq))
    lines = [f"{len(behind)} execution(s) behind (id, shard, folded, wal): {behind[:8]}"]
    for shard in range(SHARDS):
        for name in ("project", "materialize"):
            try:
                info = await js.consumer_info(consumer_stream(name, shard), f"{name}_{shard}")
            except NotFoundError:
                lines.append(f"{name}_{shard}: missing")
                continue
            lines.append(
                f"{name}_{shard}: pending={info.num_pending} ack_pending={info.num_ack_pending} "
                f"redelivered={info.num_redelivered} delivered={info.delivered.stream_seq} acked={info.ack_floor.stream_seq}"
            )
    return "\n".join(lines)


async def consumers_idle(js: JetStreamContext, names: Sequence[str]) -> bool:
    for shard in range(SHARDS):
        for name in names:
            try:
                info = await js.consumer_info(consumer_stream(name, shard), f"{name}_{shard}")
            except NotFoundError:
                return False
            if info.num_pending or info.num_ack_pending:
                return False
    return True


async def wait_folded(
    js: JetStreamContext, executions: Sequence[Execution], kernels: Sequence[KernelProcess], timeout: float
) -> None:
    """Wait until every execution's cache entry is at the last WAL seq of its history.

    Fails early when the project consumers have nothing left to deliver or ack for a
    while yet some projection still lags: those events were acked without being folded.
    """
    cache_by_shard = await caches(js)
    idle_since: list[float] = []

    async def folded() -> bool:
        behind = await lagging(cache_by_shard, executions)
        if not behind:
            return True
        if not await consumers_idle(js, ["project"]):
            idle_since.clear()
        elif not idle_since:
            idle_since.append(time.monotonic())
        elif time.monotonic() - idle_since[0] > 10:
            raise AssertionError(
                f"every project consumer acked everything, yet {len(behind)} execution(s) lag behind their WAL "
                f"(events acked without being folded):\n{await describe_lag(js, executions)}\n{report(kernels)}"
            )
        return False

    await wait_for(
        "every execution folded to its last WAL seq",
        folded,
        timeout,
        kernels,
        every=0.3,
        describe=lambda: describe_lag(js, executions),
    )


async def wait_caught_up(
    js: JetStreamContext, executions: Sequence[Execution], kernels: Sequence[KernelProcess], timeout: float
) -> None:
    """Wait until the project and materialize consumers have delivered and acked everything."""

    async def idle() -> bool:
        return await consumers_idle(js, ["project", "materialize"])

    await wait_for(
        "project and materialize consumers to catch up",
        idle,
        timeout,
        kernels,
        every=0.3,
        describe=lambda: describe_lag(js, executions),
    )


async def in_flight(js: JetStreamContext) -> dict[str, int]:
    """Delivered-but-unacked and not-yet-delivered messages over every kernel consumer right now."""
    out = {"ack_pending": 0, "pending": 0}
    for shard in range(SHARDS):
        for name in ("project", "materialize"):
            with contextlib.suppress(NotFoundError):
                info = await js.consumer_info(consumer_stream(name, shard), f"{name}_{shard}")
                out["ack_pending"] += info.num_ack_pending
                out["pending"] += info.num_pending
    return out


async def assert_served_equals_fresh_fold(
    js: JetStreamContext, snapshots: SnapshotStore, executions: Sequence[Execution]
) -> dict[str, int]:
    """The core invariant for every execution; returns how many entries were inline / pointers."""
    cache_by_shard = await caches(js)
    kinds = {"inline": 0, "pointer": 0}
    terminal_inline: list[str] = []
    gate = asyncio.Semaphore(8)

    async def one(e: Execution) -> None:
        async with gate:
            cache = cache_by_shard[e.shard]
            entry = await cache.get(e.execution_id)
            assert entry is not None, f"no projection for {e.execution_id}"
            served = await newest_snapshot(cache, snapshots, e.execution_id)
            fresh = await replay(
                js, shard=e.shard, shard_count=SHARDS, tenant=e.tenant, project=e.project, execution_id=e.execution_id
            )
        assert served is not None and fresh is not None
        assert canonical(served) == canonical(fresh), f"served projection of {e.execution_id} differs from a fresh fold"
        assert served.event_count == len(e.acked) == len({ev.event_id for ev in e.events})
        assert served.last_seq == e.last_seq
        if entry.pointer is not None:
            kinds["pointer"] += 1
            assert entry.pointer.last_seq == served.last_seq and entry.pointer.status == served.status
        else:
            kinds["inline"] += 1
            if served.status in TERMINAL:
                terminal_inline.append(f"{e.execution_id}@{e.shard} rev={entry.revision}")

    await asyncio.gather(*(one(e) for e in executions))
    # Materialize handled every event (its consumers are caught up), so every finished execution
    # must have been written to a segment and pointed at; one still inline means a lost batch.
    if terminal_inline:
        lag = await describe_lag(js, executions)
        raise AssertionError(f"{len(terminal_inline)} finished execution(s) never materialized: {terminal_inline[:5]}\n{lag}")
    return kinds


async def bootstrap_short_ttl(nc: NATS, topology: Topology) -> JetStreamContext:
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(lease_ttl_s=TTL))
    return js


# --------------------------------------------------------------------------- tests


async def test_kernel_sigkill_loop_loses_and_doubles_nothing(
    nats_server: EmbeddedServer,
    nc: NATS,
    topology: Topology,
    tmp_path: Path,
    cli_command: list[str],
    cli_environ: dict[str, str],
) -> None:
    rng = random.Random(20261122)
    kills = 4
    js = await bootstrap_short_ttl(nc, topology)
    leases = await js.key_value(LEASES_BUCKET)
    executions = make_executions(rng, 200, 10_000, node_id=1)
    assert {e.shard for e in executions} == set(range(SHARDS))
    chunks = chunked(interleave(rng, executions), 200)
    dup_ids = add_duplicates(rng, chunks, 30)
    publisher = Publisher(js, topology, executions)
    data_dir = tmp_path / "kernel"
    env = kernel_env(cli_environ)
    started: list[KernelProcess] = []

    def spawn(holder: str) -> KernelProcess:
        k = KernelProcess(cli_command, env, url=nats_server.url, holder=holder, data_dir=data_dir, logs=tmp_path)
        started.append(k)
        return k

    kill_log: list[dict[str, Any]] = []
    # ~50 chunks, a pause after each: publishing spans the whole crash loop.
    kills_done = asyncio.Event()
    publishing = asyncio.create_task(publisher.publish_paced(chunks, pause=0.3, hold_last=kills_done))
    try:
        for i in range(kills):
            k = spawn(f"crash{i}")
            await k.start()

            async def holds_all(holder: str = k.holder) -> bool:
                return set((await holders(leases)).values()) == {holder}

            # The previous incarnation's keys must age out first (within TTL): then it folds every shard.
            await wait_for(f"{k.holder} to lease every shard", holds_all, 20, started)
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            state = await in_flight(js)
            k.kill()
            kill_log.append({"holder": k.holder, "published": publisher.published, **state})
            assert not publishing.done() or publishing.exception() is None
        kills_done.set()
        final = spawn("final")
        await final.start()
        await asyncio.wait_for(publishing, 120)

        assert all(0 < k["published"] < publisher.published for k in kill_log), f"kills not during publishing: {kill_log}"
        assert any(k["ack_pending"] > 0 for k in kill_log), f"no kill hit a batch in flight: {kill_log}"
        assert len(publisher.duplicate_acks) >= len(dup_ids)
        assert {a.event_id for a in publisher.duplicate_acks} == dup_ids
        stored = sum([(await js.stream_info(f"WAL_{n}")).state.messages for n in range(SHARDS)])
        assert stored == 10_000 == sum(len(e.acked) for e in executions)

        await wait_folded(js, executions, started, 120)
        await wait_caught_up(js, executions, started, 60)
        assert final.alive(), final.stderr()

        snapshots = SnapshotStore.from_env(data_dir=data_dir, env={})
        kinds = await assert_served_equals_fresh_fold(js, snapshots, executions)
        assert kinds["pointer"] > 0, f"nothing was materialized across the crashes: {kinds}"
        assert any(snapshots.list_segments(n) for n in range(SHARDS))
        print(f"\nkills: {kill_log}\nentries: {kinds}")
    finally:
        publishing.cancel()
        with contextlib.suppress(BaseException):
            await publishing
        for k in started:
            k.kill()


async def test_two_kernels_share_shards_and_fail_over(
    nats_server: EmbeddedServer,
    nc: NATS,
    topology: Topology,
    tmp_path: Path,
    cli_command: list[str],
    cli_environ: dict[str, str],
) -> None:
    rng = random.Random(7)
    js = await bootstrap_short_ttl(nc, topology)
    leases = await js.key_value(LEASES_BUCKET)
    data_dir = tmp_path / "kernel"
    env = kernel_env(cli_environ)
    k1, k2 = (
        KernelProcess(cli_command, env, url=nats_server.url, holder=h, data_dir=data_dir, logs=tmp_path) for h in ("k1", "k2")
    )
    kernels = [k1, k2]
    before = make_executions(rng, 40, 1_200, node_id=2)
    after = make_executions(rng, 40, 1_200, node_id=3)
    # Executions that span the kill: their first half goes before, the rest after.
    spanning = {e.execution_id: e.events for e in before[:12]}
    late_events = [ev for events in spanning.values() for ev in events[len(events) // 2 :]]
    for e in before[:12]:
        e.events = e.events[: len(e.events) // 2]
    publisher = Publisher(js, topology, [*before, *after])
    publishing: asyncio.Task[None] | None = None
    try:
        await asyncio.gather(k1.start(), k2.start())

        async def shared() -> dict[int, str | None] | None:
            now = await holders(leases)
            counts = {h: list(now.values()).count(h) for h in ("k1", "k2")}
            return now if None not in now.values() and counts["k1"] >= 1 and counts["k2"] >= 1 else None

        await wait_for("k1 and k2 to share the shards", shared, 30, kernels)

        for chunk in chunked(interleave(rng, before), 200):
            await publisher.publish(chunk)
        await wait_folded(js, before, kernels, 60)

        split = await holders(leases)  # the split right before the kill (rebalancing has settled by now)
        k1_shards = sorted(s for s, h in split.items() if h == "k1")
        assert k1_shards and sorted(s for s, h in split.items() if h == "k2"), split
        k1.kill()
        killed_at = time.monotonic()

        # The executions that span the kill continue on the survivor, and new ones start there.
        for e in before[:12]:
            e.events = spanning[e.execution_id]
        late_chunks = chunked(late_events, 100) + chunked(interleave(rng, after), 200)
        publishing = asyncio.create_task(publisher.publish_paced(late_chunks, pause=0.2))

        taken: dict[int, float] = {}
        while len(taken) < len(k1_shards) and time.monotonic() - killed_at < TAKEOVER_BOUND + 5:
            now = await holders(leases)
            for shard in k1_shards:
                if shard not in taken and now[shard] == "k2":
                    taken[shard] = time.monotonic() - killed_at
            await asyncio.sleep(0.05)
        print(f"\nsplit before the kill: {split}; k2 took k1's shards after {taken} s (bound {TAKEOVER_BOUND:.2f} s)")
        assert sorted(taken) == k1_shards, f"k2 did not take over {k1_shards} (took {taken})\n{report(kernels)}"
        assert max(taken.values()) <= TAKEOVER_BOUND, f"takeover took {taken}, bound {TAKEOVER_BOUND:.2f}s"

        await asyncio.wait_for(publishing, 60)
        everything = [*before, *after]
        await wait_folded(js, everything, kernels, 60)
        await wait_caught_up(js, everything, kernels, 60)
        assert set((await holders(leases)).values()) == {"k2"}
        assert k2.alive(), k2.stderr()
        kinds = await assert_served_equals_fresh_fold(js, SnapshotStore.from_env(data_dir=data_dir, env={}), everything)
        assert kinds["pointer"] > 0, kinds
        print(f"entries: {kinds}")
    finally:
        if publishing is not None:
            publishing.cancel()
            with contextlib.suppress(BaseException):
                await publishing
        for k in kernels:
            k.kill()
