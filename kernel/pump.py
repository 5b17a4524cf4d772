"""The consumer pump: one durable pull consumer per (shard, plug-in) on ``WAL_<shard>``.

It owns fetching, acking, position tracking, dedupe and redelivery; the
plug-in sees only envelopes. Batches are sized by the consumer's lag; a batch
is acked (AckAll on its last message) only after the plug-in returned, i.e.
after its effects are durable. Poison, and messages delivered ``max_deliver``
times, are copied to ``DLQ_<shard>`` with their reason and then acked, so the
shard keeps folding.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace

from kernel.host import Plugin, Retry, ShardContext
from locator.envelope import EnvelopeError, decode_wal_message, poison_reason
from locator.subjects import dlq_subject, wal_stream, wal_subjects
from projector.fold import WalEvent

log = structlog.get_logger("noetl.kernel.pump")
tracer = trace.get_tracer("noetl.kernel.pump")

DLQ_REASON = "Noetl-Dlq-Reason"
DLQ_STREAM = "Noetl-Dlq-Stream"
DLQ_SEQ = "Noetl-Dlq-Seq"
DLQ_SUBJECT = "Noetl-Dlq-Subject"
DLQ_CONSUMER = "Noetl-Dlq-Consumer"


@dataclass
class PumpStats:
    """Counters one pump exports (the edge's /metrics reads them)."""

    consumer: str
    shard: int
    lag: int = 0
    batches: int = 0
    events: int = 0
    batch_size_sum: int = 0
    fold_seconds: float = 0.0
    dlq: int = 0
    failures: int = 0


def _header_text(text: str, limit: int = 1000) -> str:
    # Header values cannot carry newlines; long reasons are cut, never dropped.
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Pump:
    """Feeds one shard's WAL to one plug-in, exactly once in effect.

    >>> # pump = Pump(js, shard=0, shard_count=4, plugin=plugin, ctx=ctx, consumer="project")
    >>> # await pump.run(stop_event)
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        shard: int,
        shard_count: int,
        plugin: Plugin,
        ctx: ShardContext,
        consumer: str,
        max_batch: int = 1000,
        linger: float = 0.0,
        max_deliver: int = 20,
        ack_wait: float = 60.0,
        fetch_wait: float = 1.0,
    ) -> None:
        self.js = js
        self.shard = shard
        self.shard_count = shard_count
        self.plugin = plugin
        self.ctx = ctx
        self.durable = f"{consumer}_{shard}"
        self.stream = wal_stream(shard)
        self.max_batch = max_batch
        self.linger = linger
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.fetch_wait = fetch_wait
        self.stats = PumpStats(consumer=self.durable, shard=shard)
        self._failures_in_row = 0
        self.log = log.bind(shard=shard, consumer=self.durable)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.ALL,
            ack_wait=self.ack_wait,
            # No more than one batch in flight: a redelivered batch comes back before newer messages.
            max_ack_pending=self.max_batch,
            max_deliver=-1,
            filter_subject=wal_subjects(self.shard),
        )
        return await self.js.pull_subscribe(wal_subjects(self.shard), durable=self.durable, stream=self.stream, config=config)

    async def _fetch(self, sub: JetStreamContext.PullSubscription, size: int) -> list[Msg]:
        try:
            msgs = await sub.fetch(size, timeout=self.fetch_wait)
        except nats.errors.TimeoutError:
            return []
        deadline = time.monotonic() + self.linger
        while self.linger and len(msgs) < self.max_batch and (left := deadline - time.monotonic()) > 0.01:
            try:
                msgs += await sub.fetch(self.max_batch - len(msgs), timeout=left)
            except nats.errors.TimeoutError:
                break
        return msgs

    async def _dead_letter(self, msg: Msg, reason: str, detail: str, *, per_consumer: bool) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        headers = dict(msg.headers or {})
        headers.update(
            {
                DLQ_REASON: _header_text(f"{reason}: {detail}"),
                DLQ_STREAM: self.stream,
                DLQ_SEQ: str(seq),
                DLQ_SUBJECT: msg.subject,
                DLQ_CONSUMER: self.durable,
                # Both the project and materialize consumers see the same poison: store it once.
                "Nats-Msg-Id": f"dlq:{self.stream}:{seq}" + (f":{self.durable}" if per_consumer else ""),
            }
        )
        await self.js.publish(dlq_subject(self.shard, reason), msg.data or b"", headers=headers)
        self.stats.dlq += 1
        self.log.warning("dlq", reason=reason, seq=seq, subject=msg.subject, detail=_header_text(detail, 200))

    async def _split(self, msgs: list[Msg]) -> list[WalEvent]:
        events: list[WalEvent] = []
        for msg in msgs:
            meta = msg.metadata
            try:
                env = decode_wal_message(msg.subject, msg.data or b"", shard_count=self.shard_count)
            except EnvelopeError as e:
                await self._dead_letter(msg, poison_reason(e), str(e), per_consumer=False)
                continue
            if meta.num_delivered > self.max_deliver:
                await self._dead_letter(
                    msg, "max_deliver", f"delivered {meta.num_delivered} times to {self.durable}", per_consumer=True
                )
                continue
            events.append(WalEvent(meta.sequence.stream, env))
        return events

    async def _dispatch(self, events: list[WalEvent]) -> None:
        with tracer.start_as_current_span(
            "kernel.dispatch",
            attributes={
                "noetl.plugin": self.ctx.plugin,
                "noetl.shard": self.shard,
                "noetl.batch_size": len(events),
                "noetl.first_seq": events[0].seq,
                "noetl.last_seq": events[-1].seq,
            },
        ):
            started = time.perf_counter()
            await self.plugin.handle(self.ctx, events)
            self.stats.fold_seconds += time.perf_counter() - started

    async def _redeliver(self, msgs: list[Msg], delay: float) -> None:
        for msg in msgs:
            await msg.nak(delay=delay)

    async def run_once(self, sub: JetStreamContext.PullSubscription, size: int) -> int:
        """Fetch and handle one batch; returns the next batch size (sized by lag)."""
        msgs = await self._fetch(sub, size)
        if not msgs:
            self.stats.lag = 0
            return size
        events = await self._split(msgs)
        if events:
            try:
                await self._dispatch(events)
            except Retry as e:
                self.log.info("batch.later", reason=str(e), delay=e.delay)
                await self._redeliver(msgs, e.delay)
                return size
            except Exception as e:  # a plug-in failure must never stop the shard
                self._failures_in_row += 1
                self.stats.failures += 1
                delay = min(30.0, 0.2 * 2 ** min(self._failures_in_row, 8))
                self.log.error("batch.failed", error=repr(e), first_seq=events[0].seq, retry_in=delay)
                await self._redeliver(msgs, delay)
                return size
        await msgs[-1].ack_sync()
        self._failures_in_row = 0
        self.stats.batches += 1
        self.stats.events += len(events)
        self.stats.batch_size_sum += len(msgs)
        self.stats.lag = msgs[-1].metadata.num_pending
        return max(1, min(self.max_batch, self.stats.lag + 1))

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._subscribe()
        self.log.info("pump.started")
        size = min(100, self.max_batch)
        try:
            while not stop.is_set():
                try:
                    size = await self.run_once(sub, size)
                except (nats.errors.Error, asyncio.TimeoutError, ConnectionError) as e:
                    # NATS is briefly away (reconnecting): the batch was not acked and comes back.
                    self.log.warning("pump.nats_error", error=repr(e))
                    await asyncio.sleep(0.5)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be gone
                pass
            self.log.info("pump.stopped")
