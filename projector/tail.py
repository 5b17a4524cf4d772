"""Following a KV bucket's writes from the stream's end: what the edge's in-memory caches stand on.

The warm mirror (:mod:`projector.mirror`) and the catalog's ``latest`` memory
(:mod:`system_playbooks.orchestrate.latest`) each hold values read from a
bucket and must hear of every later write of them, whoever makes it. A
:class:`BucketTail` is an ordered consumer on the bucket's stream that starts
at its end: every write stored after it began reaches ``on_write`` in stream
order (nats-py's ordered consumer starts itself again past a gap, from the
last sequence it delivered). Writes made while the connection was away may be
missed, so once the connection has reconnected the tail calls ``on_reset`` (the
cache drops what it holds) and begins again from the stream's end.

A cache keeps a value it read only while :meth:`BucketTail.live` holds from
before the read to after it.

>>> # tail = BucketTail(js, "proj_0", on_write, on_reset=held.clear, headers_only=True)
>>> # await tail.follow()   # again before each read: a no-op unless the connection reconnected
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

log = structlog.get_logger("noetl.projector.tail")


class BucketTail:
    """An ordered consumer on one KV bucket's stream from its end, begun again after a reconnect."""

    def __init__(
        self, js: JetStreamContext, bucket: str, on_write: Callable[[Msg], Awaitable[None]], *,
        on_reset: Callable[[], None], headers_only: bool = False,
    ) -> None:  # fmt: skip
        self.js = js
        self.bucket = bucket
        self.prefix = f"$KV.{bucket}."
        self.on_write = on_write
        self.on_reset = on_reset
        self.headers_only = headers_only
        self.resets = 0
        self._nc: Client = js._nc
        self._sub: Subscription | None = None
        self._reconnects = -1
        self._lock = asyncio.Lock()

    def live(self) -> bool:
        """Whether every write since the tail began reaches ``on_write`` (connected, never reconnected since)."""
        return self._sub is not None and self._nc.is_connected and self._reconnects == self._nc.stats["reconnects"]

    def key(self, msg: Msg) -> str:
        return msg.subject[len(self.prefix) :]

    async def follow(self) -> None:
        """Begin at the stream's end, or begin again (after ``on_reset``) if the connection has reconnected."""
        async with self._lock:
            if self._sub is not None and self._reconnects == self._nc.stats["reconnects"]:
                return  # following (or disconnected now: then live() is false until the reconnect, and we begin again)
            old, self._sub = self._sub, None
            if old is not None:
                self.resets += 1
                self.on_reset()
                try:
                    await old.unsubscribe()
                except Exception as e:  # the old consumer may be gone with the old connection
                    log.debug("tail.unsubscribe_failed", bucket=self.bucket, error=repr(e))
            reconnects = self._nc.stats["reconnects"]
            self._sub = await self.js.subscribe(
                self.prefix + ">", stream=f"KV_{self.bucket}", cb=self.on_write, ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW, headers_only=self.headers_only or None, inactive_threshold=300.0,
            )  # fmt: skip
            self._reconnects = reconnects

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self._nc.is_closed:
            await sub.unsubscribe()
