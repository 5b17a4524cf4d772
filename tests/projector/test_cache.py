"""The KV projection cache knows what the server accepts: too large, refused and unreadable entries are typed errors."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from locator import new_event
from projector.cache import (
    VALUE_HEADROOM,
    CacheConflict,
    EntryTooLarge,
    EntryUnreadable,
    KvProjectionCache,
    pointer_to,
)
from projector.fold import WalEvent, fold
from projector.projection import Projection, canonical

SHARD = 0


def projection_of(size: int, execution_id: str = "9") -> Projection:
    """A projection whose canonical JSON is about ``size`` bytes (one step result)."""
    env = new_event(tenant="acme", project="web", execution_id=execution_id, type="step.exit", step="s",
                    attempt=1, payload={"result": "x" * size})  # fmt: skip
    p = fold(None, [WalEvent(1, env)])
    assert p is not None
    return p


async def test_the_value_limit_follows_the_servers_max_payload(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext
) -> None:
    cache = await KvProjectionCache.open(js, SHARD)
    assert nc.max_payload == nats_server.max_payload == 1024 * 1024
    assert cache.max_value == nc.max_payload - VALUE_HEADROOM
    fits = projection_of(cache.max_value - 1000)
    assert len(canonical(fits)) <= cache.max_value
    revision = await cache.put("9", fits, revision=None)
    over = projection_of(cache.max_value + 1, "10")
    with pytest.raises(EntryTooLarge, match=f"over the KV value limit of {cache.max_value}"):
        await cache.put("10", over, revision=None)
    assert await cache.get("10") is None  # nothing was written
    entry = await cache.get("9")
    assert entry is not None and entry.revision == revision and entry.projection == fits


async def test_a_limit_above_the_servers_is_still_refused_as_too_large(js: JetStreamContext, nc: NATS) -> None:
    # A wrong idea of the limit does not reach the server (which would close the connection): the client's
    # own max_payload check raises, and it is reported as EntryTooLarge all the same.
    cache = await KvProjectionCache.open(js, SHARD, max_value=8 * 1024 * 1024)
    with pytest.raises(EntryTooLarge, match="over the server's max_payload"):
        await cache.put("11", projection_of(nc.max_payload + 10, "11"), revision=None)
    assert nc.is_connected and await cache.get("11") is None


async def test_a_pointer_can_be_the_first_write_and_is_fenced_like_a_projection(js: JetStreamContext) -> None:
    cache = await KvProjectionCache.open(js, SHARD)
    p = projection_of(10, "12")
    pointer = pointer_to("file:///x/segments/shard=0/a.feather", 0, p)
    assert (pointer.last_seq, pointer.status) == (1, "RUNNING")  # a pointer says nothing of being finished
    revision = await cache.put_pointer("12", pointer, revision=None)
    with pytest.raises(CacheConflict):
        await cache.put_pointer("12", pointer, revision=None)
    entry = await cache.get("12")
    assert entry is not None and entry.pointer == pointer and entry.revision == revision and entry.projection is None


@pytest.mark.parametrize("value", [b"not json", b'{"pointer": 5}', b'{"execution_id": 7}', b"[]"])
async def test_a_value_that_is_neither_projection_nor_pointer_is_unreadable(js: JetStreamContext, value: bytes) -> None:
    cache = await KvProjectionCache.open(js, SHARD)
    await cache.kv.put("13", value)
    with pytest.raises(EntryUnreadable, match="the cache entry of 13 is neither a projection nor a pointer"):
        await cache.get("13")


async def test_owner_reads_whose_projection_it_is_and_nothing_for_a_pointer_or_no_entry(js: JetStreamContext) -> None:
    cache = await KvProjectionCache.open(js, SHARD)
    p = projection_of(1000, "14")
    await cache.put("14", p, revision=None)
    assert await cache.owner("14") == ("acme", "web")
    await cache.put_pointer("15", pointer_to("file:///x/segments/shard=0/a.feather", 0, p), revision=None)
    assert await cache.owner("15") is None  # a pointer does not say whose it is
    assert await cache.owner("16") is None
    for value in (b"not json", b'{"pointer": 5}', b"[]"):
        await cache.kv.put("17", value)
        with pytest.raises(EntryUnreadable, match="the cache entry of 17 is neither a projection nor a pointer"):
            await cache.owner("17")
