"""The edge's in-memory mirror of warm KV entries, kept current by the bucket's own stream.

A warm GET used to be a KV read: a round trip to ``nats-server``, which under
load (delivering every WAL message to three consumers per shard) answered in
tens of milliseconds. :class:`ProjectionMirror` holds the entries it has read
(bounded in bytes, least recently used first out) and follows the bucket's
stream with an ordered, headers-only consumer that starts at the stream's end:
every later write of a key, whoever makes it, arrives in stream order with its
revision and drops a held entry older than it. So a held entry is never older
than the last write the mirror has been told of, and a GET no longer asks NATS.

Three things bound what a missed notice could cost:

* a read registers its key before it asks the KV, and its answer is kept only
  if no newer revision of that key was announced meanwhile;
* an entry is served for at most ``max_age`` seconds after the read that
  brought it began, then read again: a key removed without a marker (the
  archiver's purge of a dropped entry) or a notice lost in a consumer reset is
  seen within that time. A GET of an entry past half that age is still served
  from memory and reads it again in the background (at most one read of a key
  at a time), so a key read often never waits on a busy ``nats-server``;
* when the connection reconnects, everything held is dropped and the
  consumer is created again from the stream's end.

The mirror is a cache: dropping it any time changes nothing but speed. It
also remembers which tenant and project an execution belongs to (an id never
changes owner), so ``POST …/events`` need not ask the KV before each publish.

>>> # mirror = await ProjectionMirror.open(js, shard, cache, max_bytes=16 << 20, max_age=1.0)
>>> # entry = await mirror.get("7311598424571904")   # a KV read the first time, memory after
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from locator.subjects import proj_bucket
from projector.cache import CacheEntry, KvProjectionCache
from projector.errors import ProjectorError
from projector.tail import BucketTail


log = structlog.get_logger("noetl.projector.mirror")

# Executions whose owner is remembered, per shard (an id and two short names each).
OWNERS_HELD = 100_000
# A held entry older than this share of max_age is read again in the background when it is served.
REFRESH_AT = 0.5


@dataclass(frozen=True)
class MirrorSettings:
    """How much an edge holds in memory (``max_bytes`` over all shards) and how long an entry serves unread.

    ``max_age`` 0 turns the mirror off: every warm GET reads the KV, as before it.

    >>> MirrorSettings.from_env({"NOETL_EDGE_MIRROR_MAX_AGE": "0.5"})
    MirrorSettings(max_bytes=67108864, max_age=0.5)
    >>> MirrorSettings.from_env({"NOETL_EDGE_MIRROR_BYTES": "lots"})
    Traceback (most recent call last):
    ...
    projector.errors.ProjectorError: NOETL_EDGE_MIRROR_BYTES must be a whole number of bytes >= 0, got 'lots'
    """

    max_bytes: int = 64 << 20
    max_age: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.max_age > 0 and self.max_bytes > 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MirrorSettings:
        raw_bytes = env.get("NOETL_EDGE_MIRROR_BYTES", str(cls.max_bytes))
        raw_age = env.get("NOETL_EDGE_MIRROR_MAX_AGE", str(cls.max_age))
        try:
            max_bytes = int(raw_bytes)
            if max_bytes < 0:
                raise ValueError
        except ValueError:
            raise ProjectorError(f"NOETL_EDGE_MIRROR_BYTES must be a whole number of bytes >= 0, got {raw_bytes!r}") from None
        try:
            max_age = float(raw_age)
            if not 0 <= max_age <= 3600:
                raise ValueError
        except ValueError:
            raise ProjectorError(f"NOETL_EDGE_MIRROR_MAX_AGE must be seconds from 0 to 3600, got {raw_age!r}") from None
        return cls(max_bytes=max_bytes, max_age=max_age)


@dataclass
class _Held:
    entry: CacheEntry
    size: int
    at: float


class ProjectionMirror:
    """Warm entries of one shard's ``proj_<shard>`` bucket, in memory, invalidated by the bucket's stream."""

    def __init__(
        self, js: JetStreamContext, shard: int, cache: KvProjectionCache, *, max_bytes: int, max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.js = js
        self.shard = shard
        self.cache = cache
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._bytes = 0
        # Keys being read from the KV -> (readers, the newest revision announced since the first registered).
        self._reading: dict[str, list[int]] = {}
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Bumped whenever everything held is dropped: a read that began before is not kept.
        self._generation = 0
        self.stats = {"hits": 0, "misses": 0, "dropped": 0, "resets": 0, "refreshes": 0}
        self._refreshing: set[asyncio.Task[CacheEntry | None]] = set()
        self._tail = BucketTail(js, proj_bucket(shard), self._on_write, on_reset=self._reset, headers_only=True)

    @classmethod
    async def open(
        cls, js: JetStreamContext, shard: int, cache: KvProjectionCache, *, max_bytes: int, max_age: float
    ) -> ProjectionMirror:
        mirror = cls(js, shard, cache, max_bytes=max_bytes, max_age=max_age)
        await mirror._tail.follow()
        return mirror

    def _reset(self) -> None:
        self.stats["resets"] += 1
        self._clear()

    async def _on_write(self, msg: Msg) -> None:
        key = self._tail.key(msg)
        held = self._held.get(key)
        reading = self._reading.get(key)
        if held is None and reading is None:
            return  # the common case under load: a key nobody reads here
        revision = msg.metadata.sequence.stream
        if reading is not None and revision > reading[1]:
            reading[1] = revision
        if held is not None and revision > held.entry.revision:
            self._drop(key)

    def _drop(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._bytes -= held.size
            self.stats["dropped"] += 1

    def _clear(self) -> None:
        self._held.clear()
        self._bytes = 0
        self._generation += 1

    def _keep(self, key: str, entry: CacheEntry, size: int, at: float) -> None:
        if size > self.max_bytes:
            return
        self._drop(key)
        self._held[key] = _Held(entry, size, at)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, oldest = self._held.popitem(last=False)
            self._bytes -= oldest.size

    async def get(self, execution_id: str) -> CacheEntry | None:
        """The KV entry of ``execution_id``: from memory while it is current, else read (and held)."""
        if not self._tail.live():
            await self._tail.follow()
        held = self._held.get(execution_id)
        if held is not None:
            age = self.clock() - held.at
            if age < self.max_age:
                self._held.move_to_end(execution_id)
                self.stats["hits"] += 1
                if age >= self.max_age * REFRESH_AT and execution_id not in self._reading:
                    self._refresh(execution_id)
                return held.entry
            self._drop(execution_id)
        self.stats["misses"] += 1
        return await self._read(execution_id)

    async def _read(self, execution_id: str) -> CacheEntry | None:
        """Read the KV entry and hold it, unless a newer write was announced meanwhile or the notices stopped."""
        reading = self._reading.setdefault(execution_id, [0, 0])
        reading[0] += 1
        generation, began = self._generation, self.clock()
        try:
            got = await self.cache.get_sized(execution_id)
        finally:
            reading[0] -= 1
            if not reading[0]:
                del self._reading[execution_id]
        if got is None:
            self._drop(execution_id)  # gone from the KV (purged): what is held of it goes too
            return None
        entry, size = got
        if entry.revision >= reading[1] and self._tail.live() and generation == self._generation:
            self._keep(execution_id, entry, size, began)
        return entry

    def _refresh(self, execution_id: str) -> None:
        self.stats["refreshes"] += 1
        task = asyncio.get_running_loop().create_task(self._read(execution_id))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[CacheEntry | None]) -> None:
        self._refreshing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The entry held serves until max_age, then a GET reads it itself and meets the error there.
            log.warning("mirror.refresh_failed", shard=self.shard, error=str(task.exception()))

    def remember(self, execution_id: str, tenant: str, project: str) -> None:
        """Note that ``execution_id`` is ``tenant``/``project``'s (the edge knows: it started it, or found it)."""
        self._owners[execution_id] = (tenant, project)
        self._owners.move_to_end(execution_id)
        while len(self._owners) > OWNERS_HELD:
            self._owners.popitem(last=False)

    def knows(self, execution_id: str, tenant: str, project: str) -> bool:
        return self._owners.get(execution_id) == (tenant, project)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._held)

    async def close(self) -> None:
        for task in list(self._refreshing):
            task.cancel()
        if self._refreshing:
            await asyncio.gather(*self._refreshing, return_exceptions=True)
        self._clear()
        await self._tail.close()
