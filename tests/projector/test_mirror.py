"""The edge's warm mirror serves from memory only what no later write has replaced (projector/mirror.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from locator import new_event
from locator.subjects import proj_bucket
from natscluster.server import EmbeddedServer
from projector.cache import CacheEntry, KvProjectionCache
from projector.fold import WalEvent, fold
from projector.mirror import ProjectionMirror
from projector.projection import Projection

SHARD = 0


def projection(execution_id: str, steps: int, tenant: str = "acme") -> Projection:
    events = [
        WalEvent(i + 1, new_event(tenant=tenant, project="web", execution_id=execution_id, type="step.exit",
                                  step=f"s{i}", attempt=1, payload={"rows": i}))  # fmt: skip
        for i in range(steps)
    ]
    p = fold(None, events)
    assert p is not None
    return p


@pytest.fixture
async def writer(nats_server: EmbeddedServer, js: JetStreamContext) -> AsyncIterator[KvProjectionCache]:
    """Another process's writes (the kernel's): a cache on a connection of its own."""
    await KvProjectionCache.open(js, SHARD)  # the bucket exists (bootstrapped by the js fixture)
    other = await nats.connect(nats_server.url)
    try:
        yield await KvProjectionCache.open(other.jetstream(), SHARD)
    finally:
        await other.close()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def open_mirror(js: JetStreamContext, **kw: object) -> ProjectionMirror:
    options: dict[str, object] = {"max_bytes": 1 << 20, "max_age": 60.0, **kw}
    return await ProjectionMirror.open(js, SHARD, await KvProjectionCache.open(js, SHARD), **options)  # type: ignore[arg-type]


async def test_a_held_entry_is_served_from_memory_until_a_later_write_replaces_it(
    js: JetStreamContext, writer: KvProjectionCache
) -> None:
    first = await writer.put("1", projection("1", 1), revision=None)
    mirror = await open_mirror(js)
    try:
        got = await mirror.get("1")
        assert got is not None and got.revision == first and mirror.stats["misses"] == 1
        again = await mirror.get("1")
        assert again is got and mirror.stats["hits"] == 1 and len(mirror) == 1
        two = projection("1", 2)
        second = await writer.put("1", two, revision=first)
        await eventually(lambda: len(mirror) == 0)  # the bucket's stream told the mirror
        fresh = await mirror.get("1")
        assert fresh is not None and fresh.revision == second and fresh.projection == two
        # Another key's write drops nothing.
        await writer.put("2", projection("2", 1), revision=None)
        await mirror.get("1")
        assert mirror.stats["hits"] == 2
    finally:
        await mirror.close()


class _SlowCache(KvProjectionCache):
    """A KV read that waits, after reading, until told to answer: a write lands in between."""

    def __init__(self, base: KvProjectionCache) -> None:
        super().__init__(base.kv)
        self.read = asyncio.Event()
        self.answer = asyncio.Event()

    async def get_sized(self, execution_id: str) -> tuple[CacheEntry, int] | None:
        got = await super().get_sized(execution_id)
        self.read.set()
        await self.answer.wait()
        return got


async def test_an_answer_overtaken_by_a_write_while_it_was_read_is_not_kept(
    js: JetStreamContext, writer: KvProjectionCache
) -> None:
    first = await writer.put("5", projection("5", 1), revision=None)
    slow = _SlowCache(await KvProjectionCache.open(js, SHARD))
    mirror = await ProjectionMirror.open(js, SHARD, slow, max_bytes=1 << 20, max_age=60.0)
    try:
        reading = asyncio.create_task(mirror.get("5"))
        await slow.read.wait()
        second = await writer.put("5", projection("5", 2), revision=first)
        await eventually(lambda: mirror._reading["5"][1] == second)
        slow.answer.set()
        stale = await reading
        assert stale is not None and stale.revision == first  # what the read saw, answered as read
        assert len(mirror) == 0  # but not held: the next read asks again
        fresh = await mirror.get("5")
        assert fresh is not None and fresh.revision == second and mirror.stats["misses"] == 2
    finally:
        await mirror.close()


async def test_an_entry_is_read_again_after_max_age_so_a_purge_without_a_marker_is_seen(
    js: JetStreamContext, writer: KvProjectionCache
) -> None:
    await writer.put("7", projection("7", 1), revision=None)
    now = [100.0]
    mirror = await open_mirror(js, max_age=1.0)
    mirror.clock = lambda: now[0]
    try:
        assert await mirror.get("7") is not None
        # The archiver drops an entry by purging its subject: nothing is written, so nothing is announced.
        await js.purge_stream(f"KV_{proj_bucket(SHARD)}", subject=f"$KV.{proj_bucket(SHARD)}.7")
        assert await mirror.get("7") is not None  # still within max_age
        now[0] += 1.5
        assert await mirror.get("7") is None
    finally:
        await mirror.close()


async def test_past_half_its_age_an_entry_is_served_and_read_again_in_the_background(
    js: JetStreamContext, writer: KvProjectionCache
) -> None:
    first = await writer.put("8", projection("8", 1), revision=None)
    now = [100.0]
    slow = _SlowCache(await KvProjectionCache.open(js, SHARD))
    slow.answer.set()  # the first read answers at once
    mirror = await ProjectionMirror.open(js, SHARD, slow, max_bytes=1 << 20, max_age=1.0)
    mirror.clock = lambda: now[0]
    try:
        assert await mirror.get("8") is not None and mirror.stats["misses"] == 1
        slow.read.clear()
        slow.answer.clear()
        now[0] += 0.4
        await mirror.get("8")
        assert mirror.stats["refreshes"] == 0 and not slow.read.is_set()  # young: no read
        now[0] += 0.2
        held = await mirror.get("8")  # 0.6 s old: served while it is read again, the GET does not wait for it
        assert held is not None and held.revision == first and mirror.stats["refreshes"] == 1
        await slow.read.wait()
        assert await mirror.get("8") is held and mirror.stats["refreshes"] == 1  # one read of a key at a time
        slow.answer.set()
        await eventually(lambda: not mirror._refreshing)
        now[0] += 0.6  # 1.2 s after the first read, 0.6 s after the background one began
        again = await mirror.get("8")
        assert again is not None and again is not held and mirror.stats["misses"] == 1  # the refreshed entry, held
        await eventually(lambda: not mirror._refreshing)  # it is 0.6 s old too: read again once more
        assert mirror.stats["refreshes"] == 2
        # A purge without a marker is seen by the next background read: what it held is dropped.
        await js.purge_stream(f"KV_{proj_bucket(SHARD)}", subject=f"$KV.{proj_bucket(SHARD)}.8")
        now[0] += 0.6
        served = await mirror.get("8")  # still within max_age of the read that brought it
        assert served is not None and served.revision == first and mirror.stats["refreshes"] == 3
        await eventually(lambda: not mirror._refreshing)
        assert len(mirror) == 0 and await mirror.get("8") is None
    finally:
        await mirror.close()


async def test_a_background_read_overtaken_by_a_write_is_not_kept(js: JetStreamContext, writer: KvProjectionCache) -> None:
    first = await writer.put("9", projection("9", 1), revision=None)
    now = [100.0]
    slow = _SlowCache(await KvProjectionCache.open(js, SHARD))
    slow.answer.set()
    mirror = await ProjectionMirror.open(js, SHARD, slow, max_bytes=1 << 20, max_age=1.0)
    mirror.clock = lambda: now[0]
    try:
        await mirror.get("9")
        slow.read.clear()
        slow.answer.clear()
        now[0] += 0.6
        await mirror.get("9")  # starts the background read, held back until answered
        await slow.read.wait()
        second = await writer.put("9", projection("9", 2), revision=first)
        await eventually(lambda: len(mirror) == 0 and mirror._reading["9"][1] == second)
        slow.answer.set()  # the background read answers what it read before the write
        await eventually(lambda: not mirror._refreshing)
        assert len(mirror) == 0  # not held
        fresh = await mirror.get("9")
        assert fresh is not None and fresh.revision == second
    finally:
        await mirror.close()


async def test_memory_is_bounded_least_recently_used_first_out(js: JetStreamContext, writer: KvProjectionCache) -> None:
    for i in range(10, 20):
        await writer.put(str(i), projection(str(i), 3), revision=None)
    one = (await writer.get_sized("10") or (None, 0))[1]
    mirror = await open_mirror(js, max_bytes=one * 4)
    try:
        for i in range(10, 20):
            await mirror.get(str(i))
            if i == 18:
                await mirror.get("16")  # used again: the oldest is now "17"
        assert len(mirror) == 4 and mirror.held_bytes <= one * 4
        assert list(mirror._held) == ["17", "18", "16", "19"]
        too_big = await open_mirror(js, max_bytes=one - 1)
        try:
            assert await too_big.get("10") is not None and len(too_big) == 0  # answered, never held
        finally:
            await too_big.close()
    finally:
        await mirror.close()


async def test_a_reconnect_drops_what_is_held_and_follows_the_bucket_again(
    js: JetStreamContext, nc: NATS, writer: KvProjectionCache
) -> None:
    first = await writer.put("3", projection("3", 1), revision=None)
    mirror = await open_mirror(js)
    try:
        await mirror.get("3")
        assert len(mirror) == 1
        nc.stats["reconnects"] += 1  # as nats-py counts a reconnect: notices may have been missed meanwhile
        got = await mirror.get("3")
        assert got is not None and mirror.stats == {"hits": 0, "misses": 2, "dropped": 0, "resets": 1, "refreshes": 0}
        await writer.put("3", projection("3", 2), revision=first)
        await eventually(lambda: len(mirror) == 0)  # the new consumer tells of writes as the first did
    finally:
        await mirror.close()


async def test_owners_are_remembered_per_tenant_and_project(js: JetStreamContext) -> None:
    mirror = await open_mirror(js)
    try:
        assert not mirror.knows("9", "acme", "web")
        mirror.remember("9", "acme", "web")
        assert mirror.knows("9", "acme", "web")
        assert not mirror.knows("9", "other", "web") and not mirror.knows("9", "acme", "app")
    finally:
        await mirror.close()
