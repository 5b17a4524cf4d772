"""Shard leases against a real nats-server: fair split, clean handover, crash takeover, fencing, outages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from kernel.bootstrap import StreamSettings, bootstrap
from kernel.connect import close, connect
from kernel.errors import ConfigError
from kernel.leases import LeaseBucketError, ShardLeases, lease_holder, member_key, shard_key
from natscluster.server import EmbeddedServer
from locator.subjects import LEASES_BUCKET
from locator.topology import Topology

TTL = 1.0
INTERVAL = TTL / 3
SHARDS = [0, 1, 2, 3]
# Room for a loaded 2-core machine and for the server's expiry timer; waits are bounded, never slept out.
SLACK = 4.0


class Kernel:
    """One kernel process as far as leases go: its own NATS connection, a ShardLeases and the task running it."""

    def __init__(self, url: str, holder: str, *, ttl: float, interval: float | None, via_kv: bool) -> None:
        self.url, self.holder, self.ttl, self.interval, self.via_kv = url, holder, ttl, interval, via_kv
        self.acquired: list[tuple[int, int]] = []
        self.lost: list[int] = []
        self.stop_event = asyncio.Event()
        self.nc: NATS | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def held(self) -> dict[int, int]:
        return self.leases.held

    async def start(self) -> None:
        self.nc = await connect([self.url], name=self.holder)
        js = self.nc.jetstream()
        store = await js.key_value(LEASES_BUCKET) if self.via_kv else js

        async def acquired(shard: int, revision: int) -> None:
            self.acquired.append((shard, revision))

        async def lost(shard: int) -> None:
            self.lost.append(shard)

        self.leases = ShardLeases(
            store,
            holder=self.holder,
            shards=SHARDS,
            ttl=self.ttl,
            interval=self.interval,
            on_acquired=acquired,
            on_lost=lost,
        )
        self.task = asyncio.create_task(self.leases.run(self.stop_event))

    async def stop(self) -> None:
        """Clean shutdown: run() releases everything before it returns."""
        assert self.task is not None
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)
        await self._close()

    async def crash(self) -> None:
        """Die without releasing anything: the task is cancelled and the connection dropped."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            # Bounded: a teardown must not hang the suite when a loaded host delays the cancellation.
            await asyncio.wait({self.task}, timeout=10)
        await self._close()

    async def _close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(close(self.nc), 10)


StartKernel = Callable[..., Awaitable[Kernel]]


@pytest.fixture
async def short_ttl(nc: NATS, topology: Topology) -> JetStreamContext:
    """A fresh server bootstrapped with a 1 s lease TTL (the ``js`` fixture uses the default 5 s)."""
    js = nc.jetstream()
    await bootstrap(js, topology, settings=StreamSettings(lease_ttl_s=TTL))
    return js


@pytest.fixture
async def kernels(nats_server: EmbeddedServer) -> AsyncIterator[StartKernel]:
    started: list[Kernel] = []

    async def start(holder: str, *, ttl: float = TTL, interval: float | None = None, via_kv: bool = False) -> Kernel:
        kernel = Kernel(nats_server.url, holder, ttl=ttl, interval=interval, via_kv=via_kv)
        started.append(kernel)
        await kernel.start()
        return kernel

    yield start
    for kernel in started:
        await kernel.crash()


async def until(
    cond: Callable[[], bool], *, within: float, what: str, invariant: Callable[[], None] | None = None
) -> float:
    """Poll ``cond`` (checking ``invariant`` at every sample) until it holds; return the seconds it took."""
    start = time.monotonic()
    while True:
        if invariant is not None:
            invariant()
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within:.1f} s: {what}")
        await asyncio.sleep(0.02)


def disjoint(*kernels: Kernel) -> Callable[[], None]:
    """Invariant: no shard is claimed by two kernels at the same instant."""

    def check() -> None:
        seen: dict[int, str] = {}
        for kernel in kernels:
            for shard in kernel.held:
                assert shard not in seen, f"shard {shard} held by both {seen[shard]} and {kernel.holder}"
                seen[shard] = kernel.holder

    return check


def split_evenly(a: Kernel, b: Kernel) -> Callable[[], bool]:
    return lambda: len(a.held) == 2 and len(b.held) == 2


async def test_single_kernel_takes_every_shard_and_gives_them_back(short_ttl: JetStreamContext, kernels: StartKernel) -> None:
    kv = await short_ttl.key_value(LEASES_BUCKET)
    a = await kernels("kernel-a")
    await until(lambda: sorted(a.held) == SHARDS, within=TTL + SLACK, what="one kernel holds every shard")
    assert dict(a.acquired) == a.held  # the callback's revision is the fencing token held exposes
    for shard in SHARDS:
        value = await lease_holder(kv, shard)
        assert value is not None and value.holder == "kernel-a" and value.acquired_at.endswith("Z")

    await a.stop()
    assert sorted(a.lost) == SHARDS and a.held == {}
    assert [await lease_holder(kv, shard) for shard in SHARDS] == [None] * 4
    with pytest.raises(KeyNotFoundError):
        await kv.get(member_key("kernel-a"))


async def test_two_kernels_split_two_and_two_without_overlap(short_ttl: JetStreamContext, kernels: StartKernel) -> None:
    a = await kernels("kernel-a")
    b = await kernels("kernel-b", via_kv=True)  # the KeyValue form, as kernel.runtime passes it
    no_overlap = disjoint(a, b)
    await until(split_evenly(a, b), within=3 * TTL + SLACK, what="2 + 2 split", invariant=no_overlap)
    # Keep sampling for a few TTLs: renewals and membership must not shake a settled split into overlap.
    deadline = time.monotonic() + 3 * TTL
    while time.monotonic() < deadline:
        no_overlap()
        await asyncio.sleep(0.02)
    await until(split_evenly(a, b), within=SLACK, what="2 + 2 split after settling", invariant=no_overlap)

    kv = await short_ttl.key_value(LEASES_BUCKET)
    owners = {shard: value.holder for shard in SHARDS if (value := await lease_holder(kv, shard))}
    assert owners == {**{s: "kernel-a" for s in a.held}, **{s: "kernel-b" for s in b.held}}


async def test_clean_stop_hands_shards_over_before_a_ttl(js: JetStreamContext, kernels: StartKernel) -> None:
    # The default 5 s TTL with a short interval: a handover faster than the TTL cannot be an age-out.
    ttl, interval = 5.0, 0.25
    a = await kernels("kernel-a", ttl=ttl, interval=interval)
    b = await kernels("kernel-b", ttl=ttl, interval=interval)
    no_overlap = disjoint(a, b)
    await until(split_evenly(a, b), within=ttl + SLACK, what="2 + 2 split", invariant=no_overlap)
    released, lost_before = sorted(a.held), len(a.lost)  # a may have shed shards while b joined

    stopping = asyncio.create_task(a.stop())
    took = await until(lambda: sorted(b.held) == SHARDS, within=ttl - 0.5, what="handover", invariant=no_overlap)
    await stopping
    assert sorted(a.lost[lost_before:]) == released
    print(f"clean handover took {took:.2f} s (ttl {ttl} s, interval {interval} s)")


async def test_crashed_holder_loses_its_shards_within_ttl_plus_interval(
    short_ttl: JetStreamContext, kernels: StartKernel
) -> None:
    a = await kernels("kernel-a")
    b = await kernels("kernel-b")
    no_overlap = disjoint(a, b)
    await until(split_evenly(a, b), within=3 * TTL + SLACK, what="2 + 2 split", invariant=no_overlap)

    lost_before = len(a.lost)  # a may have shed shards while b joined
    await a.crash()
    # a's own view expires by its clock before the server can give its shards away, so the
    # sampled views of the dead and the living kernel never overlap either.
    took = await until(
        lambda: sorted(b.held) == SHARDS,
        within=TTL + INTERVAL + SLACK,
        what="survivor takes over the dead kernel's shards",
        invariant=no_overlap,
    )
    assert a.lost[lost_before:] == []  # a crash calls nothing
    print(f"takeover after crash took {took:.2f} s (ttl {TTL} s, interval {INTERVAL:.2f} s)")


class PausableClock:
    """A monotonic clock that can stop, as a process frozen by a GC pause or a suspended VM sees time."""

    def __init__(self) -> None:
        self.frozen_at: float | None = None

    def __call__(self) -> float:
        return time.monotonic() if self.frozen_at is None else self.frozen_at

    def freeze(self) -> None:
        self.frozen_at = time.monotonic()


async def test_stale_holder_is_fenced_after_takeover(short_ttl: JetStreamContext, kernels: StartKernel) -> None:
    kv = await short_ttl.key_value(LEASES_BUCKET)
    clock = PausableClock()
    lost: list[int] = []

    async def ignore(shard: int, revision: int) -> None:
        pass

    async def record_lost(shard: int) -> None:
        lost.append(shard)

    stale = ShardLeases(short_ttl, holder="kernel-a", shards=SHARDS, ttl=TTL, on_acquired=ignore, on_lost=record_lost, clock=clock)
    await stale.tick()
    assert sorted(stale.held) == SHARDS
    old_tokens = stale.held
    old_revision = (await kv.get(shard_key(0))).revision
    assert old_revision is not None

    clock.freeze()  # kernel-a stops running and, frozen, cannot notice that its TTL passes
    b = await kernels("kernel-b")
    await until(lambda: sorted(b.held) == SHARDS, within=TTL + INTERVAL + SLACK, what="takeover from a frozen holder")
    assert sorted(stale.held) == SHARDS  # the frozen holder still believes: only the server can stop it
    assert min(b.held.values()) > max(old_tokens.values())  # tokens grow with every new holder

    with pytest.raises(KeyWrongLastSequenceError):
        await kv.update(shard_key(0), b"{}", last=old_revision)
    await stale.tick()  # thawed: every renewal is refused, so every lease is reported lost
    assert sorted(lost) == SHARDS
    # It may rejoin and win shards back on that same tick, but only as a new holder with new tokens.
    assert all(token > old_tokens[shard] for shard, token in stale.held.items())
    disjoint(b)()
    assert not set(stale.held) & set(b.held)


async def test_outage_drops_leases_after_ttl_and_recovers(
    short_ttl: JetStreamContext, kernels: StartKernel, nats_server: EmbeddedServer
) -> None:
    a = await kernels("kernel-a")
    await until(lambda: sorted(a.held) == SHARDS, within=TTL + SLACK, what="one kernel holds every shard")

    await asyncio.to_thread(nats_server.stop)
    took = await until(lambda: a.held == {}, within=TTL + SLACK, what="leases dropped while NATS is down")
    await until(lambda: sorted(a.lost) == SHARDS, within=SLACK, what="on_lost for every shard")
    assert a.task is not None and not a.task.done()  # transient errors never end run()

    nats_server.start()  # same port and store: the bucket and its (aging) keys survive
    await until(lambda: sorted(a.held) == SHARDS, within=2 * TTL + INTERVAL + 3 * SLACK, what="reacquired after restart")
    assert a.task is not None and not a.task.done()
    print(f"held nothing {took:.2f} s after NATS went down (ttl {TTL} s)")


async def test_bad_settings_are_refused(nc: NATS, js: JetStreamContext) -> None:
    async def noop(*_: int) -> None:
        pass

    def make(store: JetStreamContext, **kw: object) -> ShardLeases:
        options: dict[str, object] = {"holder": "k", "shards": SHARDS, "ttl": TTL, "on_acquired": noop, "on_lost": noop}
        options.update(kw)
        return ShardLeases(store, **options)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="holder id"):
        make(js, holder="bad holder*")
    with pytest.raises(ConfigError, match="interval"):
        make(js, interval=TTL)
    # The `js` fixture bootstrapped the default 5 s TTL: a kernel assuming 1 s would outlive its keys.
    with pytest.raises(LeaseBucketError, match="expires keys after 5"):
        await make(js).tick()


async def test_missing_bucket_is_refused(nc: NATS) -> None:
    async def noop(*_: int) -> None:
        pass

    leases = ShardLeases(nc.jetstream(), holder="k", shards=SHARDS, ttl=TTL, on_acquired=noop, on_lost=noop)
    with pytest.raises(LeaseBucketError, match="bootstrap"):
        await leases.run(asyncio.Event())


async def test_kernels_running_different_plugins_each_hold_every_shard(
    nc: NATS, js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    # An orchestrate-only kernel and a fold-only kernel lease in groups of their own: both hold all shards.
    from kernel.host import system_manifests
    from kernel.runtime import Kernel
    from projector.snapshots import SnapshotStore

    store = SnapshotStore(f"file://{tmp_path}/objects")
    orchestrate = Kernel(nc, topology=topology, snapshots=store, holder="k-orch", manifests=system_manifests(["orchestrate"]))
    fold = Kernel(nc, topology=topology, snapshots=store, holder="k-fold", manifests=system_manifests(["project", "materialize"]))
    everything = Kernel(nc, topology=topology, snapshots=store, holder="k-all")
    assert (orchestrate.lease_group, fold.lease_group, everything.lease_group) == ("orchestrate", "materialize-project", "")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(k.run(stop)) for k in (orchestrate, fold)]
    try:
        for _ in range(200):
            if orchestrate.shards == fold.shards == list(range(topology.shard_count)):
                break
            await asyncio.sleep(0.05)
        assert orchestrate.shards == fold.shards == list(range(topology.shard_count))
        kv = await js.key_value(LEASES_BUCKET)
        for shard in range(topology.shard_count):
            assert (await lease_holder(kv, shard, "orchestrate")).holder == "k-orch"  # type: ignore[union-attr]
            assert (await lease_holder(kv, shard, "materialize-project")).holder == "k-fold"  # type: ignore[union-attr]
            assert await lease_holder(kv, shard) is None
    finally:
        stop.set()
        await asyncio.gather(*tasks)
