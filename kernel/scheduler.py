"""Durable timers: publish a prepared WAL event when it falls due.

A plug-in that needs to act later (a callback's timeout, a retry's backoff)
publishes a :class:`~locator.command.Timer` to ``cmd.<shard>.timer``. The
scheduler of the kernel holding the shard pulls it, and until it is due
answers "not yet" with a delayed NAK, so the timer lives in JetStream, not in
memory: it survives kernel restarts and moves with the shard's lease. When it
is due, the prepared event is published with its ``Nats-Msg-Id`` (a timer
that fires twice stores one event) and the timer is acked.

The scheduler does not read what it publishes: the event means something only
to the plug-in that prepared it.

The schedule firer that the kernel runtime also runs is domain logic and
lives with the schedules (:mod:`system_playbooks.schedules.firer`).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from locator.command import TIMER_POOL, timer_decoder
from locator.subjects import cmd_stream, cmd_subject, wal_subjects

log = structlog.get_logger("noetl.kernel.scheduler")

DURABLE = "scheduler"
BATCH = 100
MAX_PENDING = 50_000


class Scheduler:
    """Fires one shard's timers; run it while holding the shard's lease."""

    def __init__(self, js: JetStreamContext, *, shard: int, fetch_wait: float = 1.0) -> None:
        self.js = js
        self.shard = shard
        self.fetch_wait = fetch_wait
        self.fired = 0
        self.log = log.bind(shard=shard)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=f"{DURABLE}_{self.shard}",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_deliver=-1,
            max_ack_pending=MAX_PENDING,
            filter_subject=cmd_subject(self.shard, TIMER_POOL),
        )
        return await self.js.pull_subscribe(
            cmd_subject(self.shard, TIMER_POOL), durable=f"{DURABLE}_{self.shard}", stream=cmd_stream(self.shard),
            config=config,
        )

    async def _handle(self, msg: Msg) -> None:
        try:
            timer = timer_decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            self.log.error("timer.poison", error=str(e))
            await msg.term()
            return
        if not timer.subject.startswith(wal_subjects(self.shard)[:-1]):
            self.log.error("timer.refused", subject=timer.subject, reason="not this shard's WAL")
            await msg.term()
            return
        left = timer.due_ms / 1000 - time.time()
        if left > 0:
            await msg.nak(delay=max(left, 0.001))
            return
        await self.js.publish(timer.subject, timer.data, headers={"Nats-Msg-Id": timer.msg_id})
        await msg.ack()
        self.fired += 1
        self.log.debug("timer.fired", msg_id=timer.msg_id, late_ms=int(-left * 1000))

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._subscribe()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(BATCH, timeout=self.fetch_wait)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except (nats.errors.Error, ConnectionError) as e:
                    self.log.warning("scheduler.nats_error", error=repr(e))
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    try:
                        await self._handle(msg)
                    except (nats.errors.Error, asyncio.TimeoutError, ConnectionError) as e:
                        # Not acked: the timer comes back after ack_wait and is tried again.
                        self.log.warning("timer.publish_failed", error=repr(e))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be gone
                pass
