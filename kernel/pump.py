"""The consumer pump: one durable pull consumer per (shard, plug-in) on the stream the plug-in consumes.

That is ``WAL_<shard>`` (``source: wal``: the plug-in sees envelopes), or the
projection bucket's stream ``KV_proj_<shard>`` (``source: projections``: it sees
each stored projection write; delete and purge markers are skipped).

It owns fetching, acking, position tracking, dedupe and redelivery. Batches
are sized by the consumer's lag; a batch is acked (AckAll on its last message;
each message on a bucket's stream, see ``Pump.ack_all``) only after the
plug-in returned, i.e. after its effects are durable. Poison, and messages
delivered ``max_deliver`` times, are copied to ``DLQ_<shard>`` with their
reason and then acked, so the shard keeps folding.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KV_OP  # a KV delete or purge marker's header (the marker carries no value)
from opentelemetry import trace

from kernel.dlq import DLQ_CONSUMER, DLQ_REASON, DLQ_SEQ, DLQ_STREAM, DLQ_SUBJECT, dead_letter, header_text
from kernel.host import Plugin, Reject, Retry, ShardContext
from locator.envelope import Envelope, EnvelopeError, decode_wal_message, poison_reason
from locator.subjects import proj_stream, proj_subjects, wal_consumer, wal_stream, wal_subjects
from projector.cache import ProjectionWrite
from projector.fold import WalEvent

__all__ = ["DLQ_CONSUMER", "DLQ_REASON", "DLQ_SEQ", "DLQ_STREAM", "DLQ_SUBJECT", "Pump", "PumpStats", "stream_seq"]

log = structlog.get_logger("noetl.kernel.pump")
tracer = trace.get_tracer("noetl.kernel.pump")
# After a linger, the longest wait for what has arrived meanwhile (if nothing has, the batch goes as it is).
LINGER_TAKE = 0.02
# NATS itself is away or slow: no message is at fault, so a batch that meets one of these is not counted
# towards isolating or dead-lettering a message. A server that refuses a request (an API error) is counted.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
)


@dataclass
class PumpStats:
    """Counters of one pump, exported through ``Kernel.stats()`` (for the edge's /metrics)."""

    consumer: str
    shard: int
    lag: int = 0
    batches: int = 0
    events: int = 0
    batch_size_sum: int = 0
    fold_seconds: float = 0.0
    dlq: int = 0
    failures: int = 0


def stream_seq(msg: Msg) -> int:
    """The message's stream sequence, read straight from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>…`` (9 tokens), or with a
    domain and account hash before the stream (12 tokens). ``msg.metadata``
    would build datetimes and dataclasses for every message; this is per event.
    """
    tokens = (msg.reply or "").split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class Decoded:
    """Envelopes decoded from a WAL, shared by the pumps of one process: a shard's WAL consumers read the same
    messages, so an event is decoded once, not three times.

    Keyed by stream and sequence, and used only if the subject and the bytes are the very ones decoded (a stream
    deleted and created again reuses its sequences). Poison is never kept: each pump decides about it. The oldest
    entries go first.

    >>> d = Decoded(capacity=2)
    >>> d.put("WAL_0", 1, "s", b"x", "env-1"); d.put("WAL_0", 2, "s", b"y", "env-2")
    >>> d.get("WAL_0", 1, "s", b"x"), d.get("WAL_0", 1, "s", b"z")
    ('env-1', None)
    >>> d.put("WAL_0", 3, "s", b"z", "env-3"); d.get("WAL_0", 1, "s", b"x")
    """

    def __init__(self, *, capacity: int = 16_384) -> None:
        self.capacity = capacity
        # Ordered, so the oldest goes in O(1) (``next(iter(dict))`` walks past every slot deleted before).
        self._held: OrderedDict[tuple[str, int], tuple[str, bytes, Envelope]] = OrderedDict()

    def get(self, stream: str, seq: int, subject: str, data: bytes) -> Envelope | None:
        held = self._held.get((stream, seq))
        if held is None or held[0] != subject or held[1] != data:
            return None
        return held[2]

    def put(self, stream: str, seq: int, subject: str, data: bytes, env: Envelope) -> None:
        held = self._held
        held[(stream, seq)] = (subject, data, env)
        if len(held) > self.capacity:
            held.popitem(last=False)


# The kernel's pumps all run in one process (on one loop): they share what they decode.
DECODED = Decoded()


class Pump:
    """Feeds one shard's stream (its WAL, or its projection bucket's) to one plug-in, in order, exactly once in effect.

    The durable consumer is the position of record, and the pump always places
    it explicitly: on start at its ack floor + 1, after a failed batch at that
    batch's first sequence. So no later message can be acked (AckAll) past one
    that was not handled. A batch that keeps failing is retried one message at
    a time, and a single message that fails ``max_deliver`` times is
    dead-lettered; the shard then goes on.

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
        isolate_after: int = 3,
        types: Sequence[str] = (),
        source: str = "wal",
        unfilter_at: int = 500,
        refilter_at: int = 10,
    ) -> None:
        self.js = js
        self.shard = shard
        self.shard_count = shard_count
        self.plugin = plugin
        self.ctx = ctx
        self.durable = wal_consumer(consumer, shard)
        self.source = source
        if source == "projections":
            self.stream, self.subjects = proj_stream(shard), proj_subjects(shard)
            self._key_at = len(proj_subjects(shard)) - 1  # $KV.proj_<shard>.<execution id>
        elif source == "wal":
            self.stream, self.subjects = wal_stream(shard), wal_subjects(shard)
        else:
            raise ValueError(f"a pump's source is 'wal' or 'projections', not {source!r}")
        # A consumer of the same name on the WAL is one an earlier version read there: retired on first subscribe.
        self._retire = source != "wal"
        # A bucket keeps one value per key: when a value is written again while its message is delivered and
        # not yet acked, the server terminates that message as if acked — and under AckAll that acks every
        # message delivered before it too, handled or not (lost if the process dies now). So each message of
        # a bucket's stream is acked on its own; the WAL keeps everything it stores, and acks a batch at once.
        self.ack_all = source == "wal"
        self.max_batch = max_batch
        self.linger = linger
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.fetch_wait = fetch_wait
        self.isolate_after = isolate_after
        # The types the plug-in is delivered (empty: all). While the pump keeps up, its consumer filters on them
        # (one filter subject per type), so events it has no use for cost it no delivery. Once ``unfilter_at`` of
        # them are pending, the consumer reads every event and _split picks the types by subject, until fewer than
        # ``refilter_at`` events are pending: nats-server finds a multi-filter consumer's next message by walking
        # every subject of a message block (one per execution and type) whenever the consumer is behind —
        # 75-80 % of its CPU under a flood, for each message it delivered.
        self.types = frozenset(types)
        self.filters = [f"wal.{shard}.*.*.*.{t}" for t in sorted(self.types)]
        self.filtered = bool(self.filters)
        self.unfilter_at, self.refilter_at = unfilter_at, refilter_at
        self.stats = PumpStats(consumer=self.durable, shard=shard)
        self.log = log.bind(shard=shard, consumer=self.durable)
        self._failing_seq = 0  # first sequence of the batch that failed last
        self._failures = 0  # consecutive failures at _failing_seq
        self._isolate_until = 0  # handle one message at a time up to this sequence
        self._stop = asyncio.Event()  # run()'s: a pause ends early when the pump is stopped

    def _filter(self) -> dict[str, Any]:
        """The consumer's filter fields in the current mode: one subject per type, or the whole stream."""
        if self.filtered:
            return {"filter_subject": None, "filter_subjects": self.filters}
        return {"filter_subject": self.subjects, "filter_subjects": None}

    async def _subscribe(self, start_seq: int | None = None) -> JetStreamContext.PullSubscription:
        """(Re)create the durable consumer at ``start_seq``, or at its own ack floor + 1."""
        if self._retire:
            try:
                await self.js.delete_consumer(wal_stream(self.shard), self.durable)
                self.log.info("pump.retired_wal_consumer", stream=wal_stream(self.shard))
            except NotFoundError:
                pass
            self._retire = False
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            floor = 0
        else:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            await self.js.delete_consumer(self.stream, self.durable)
        start = floor + 1 if start_seq is None else start_seq
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            ack_policy=AckPolicy.ALL if self.ack_all else AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_batch,
            max_deliver=-1,
            **self._filter(),
        )
        return await self.js.pull_subscribe(self.subjects, durable=self.durable, stream=self.stream, config=config)

    async def _fetch(self, sub: JetStreamContext.PullSubscription, size: int) -> list[Msg]:
        try:
            msgs = await sub.fetch(size, timeout=self.fetch_wait)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []
        if self.linger and msgs and len(msgs) < self.max_batch and stream_seq(msgs[0]) > self._isolate_until:
            # Let more arrive, then take them with one request: one fetch, one ack and one write for all.
            await asyncio.sleep(self.linger)
            try:
                msgs += await sub.fetch(self.max_batch - len(msgs), timeout=LINGER_TAKE)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                pass
        return msgs

    async def _dead_letter(self, msg: Msg, reason: str, detail: str, *, per_consumer: bool) -> None:
        seq = stream_seq(msg)
        await dead_letter(
            self.js,
            msg,
            shard=self.shard,
            stream=self.stream,
            seq=seq,
            consumer=self.durable,
            reason=reason,
            detail=detail,
            # Every WAL consumer that decodes the event (project, orchestrate…) sees the same poison: store it once.
            msg_id=f"dlq:{self.stream}:{seq}" + (f":{self.durable}" if per_consumer else ""),
        )
        self.stats.dlq += 1
        self.log.warning("dlq", reason=reason, seq=seq, subject=msg.subject, detail=header_text(detail, 200))

    async def _split(self, msgs: list[Msg]) -> list[WalEvent] | list[ProjectionWrite]:
        if self.source == "projections":
            return [ProjectionWrite(stream_seq(m), m.subject[self._key_at :], m.data or b"")
                    for m in msgs if not (m.headers and KV_OP in m.headers)]  # fmt: skip
        events: list[WalEvent] = []
        types = self.types
        for msg in msgs:
            if types and msg.subject.split(".", 5)[-1] not in types:
                continue  # a type the plug-in has no use for (read unfiltered): acked with the batch, never decoded
            seq, data = stream_seq(msg), msg.data or b""
            env = DECODED.get(self.stream, seq, msg.subject, data)
            if env is None:
                try:
                    env = decode_wal_message(msg.subject, data, shard_count=self.shard_count)
                except EnvelopeError as e:
                    await self._dead_letter(msg, poison_reason(e), str(e), per_consumer=False)
                    continue
                DECODED.put(self.stream, seq, msg.subject, data, env)
            events.append(WalEvent(seq, env))
        return events

    async def _dispatch(self, events: list[WalEvent] | list[ProjectionWrite]) -> Sequence[Reject]:
        with tracer.start_as_current_span(
            "kernel.dispatch",
            attributes={
                "noetl.plugin": self.ctx.plugin,
                "noetl.shard": self.shard,
                "noetl.batch_size": len(events),
                "noetl.first_seq": events[0][0],
                "noetl.last_seq": events[-1][0],
            },
        ):
            started = time.perf_counter()
            rejected = await self.plugin.handle(self.ctx, events)
            self.stats.fold_seconds += time.perf_counter() - started
        return rejected or ()

    async def _failed(self, msgs: list[Msg], error: BaseException) -> None:
        first, last = stream_seq(msgs[0]), stream_seq(msgs[-1])
        if first == self._failing_seq:
            self._failures += 1
        else:
            self._failing_seq, self._failures = first, 1
        # After a few failures, or once already narrowing down, go one message at a time.
        if self._failures >= self.isolate_after or first <= self._isolate_until:
            self._isolate_until = max(self._isolate_until, last)
        self.stats.failures += 1
        self.log.error("batch.failed", error=repr(error), first_seq=first, last_seq=last, failures=self._failures)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the pump is told to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _size(self, next_seq: int, lag: int) -> int:
        if next_seq <= self._isolate_until:
            return 1
        return max(1, min(self.max_batch, lag + 1))

    async def run_once(self, sub: JetStreamContext.PullSubscription, size: int) -> tuple[int, int | None]:
        """Handle one batch; returns (next batch size, sequence to resubscribe from: a batch to redo, or a
        filter switch the consumer refused in place)."""
        msgs = await self._fetch(sub, size)
        if not msgs:
            self.stats.lag = 0
            return size, None
        first = stream_seq(msgs[0])
        try:
            events = await self._handle(msgs, first)
        except Retry as e:
            self.log.info("batch.later", reason=str(e), delay=e.delay, first_seq=first)
            await self._pause(e.delay)
            return size, first
        except TRANSIENT:
            raise  # NATS is away: run() resubscribes from the ack floor, and this batch is not held against it
        except Exception as e:  # anything else, in the decode, the plug-in or a dead letter, must never stop the shard
            await self._failed(msgs, e)
            await self._pause(min(30.0, 0.2 * 2 ** min(self._failures, 8)))
            return self._size(first, 0), first
        # Not waited for: the next fetch follows on the same connection, so the server has the ack first;
        # an ack lost with the connection only redelivers a batch, which every plug-in handles idempotently.
        for msg in msgs[-1:] if self.ack_all else msgs:
            await msg.ack()
        last = stream_seq(msgs[-1])
        if last >= self._failing_seq:
            self._failures = 0  # the message that failed has now been handled (or dead-lettered)
        self.stats.batches += 1
        self.stats.events += len(events)
        self.stats.batch_size_sum += len(msgs)
        self.stats.lag = lag = msgs[-1].metadata.num_pending
        if self.filters and (lag >= self.unfilter_at if self.filtered else lag < self.refilter_at):
            self.filtered = not self.filtered
            self.log.info("pump.filter", filtered=self.filtered, lag=lag, next_seq=last + 1)
            if not await self._refilter():
                return self._size(last + 1, lag), last + 1  # everything up to last is handled: a new consumer from there
        return self._size(last + 1, lag), None

    async def _refilter(self) -> bool:
        """Give the consumer the filters of the current mode in place; whether it took them.

        An update keeps the consumer's position and what it delivered: no gap in which the durable is gone
        (a process dying there would start the shard over), and a message on its way to the subscription is
        still fetched next. Events of types the plug-in does not read are skipped either way.
        """
        try:
            config = (await self.js.consumer_info(self.stream, self.durable)).config
            await self.js.add_consumer(self.stream, config.evolve(**self._filter()))
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            self.log.warning("pump.refilter_failed", error=repr(e))
            return False
        return True

    async def _handle(self, msgs: list[Msg], first: int) -> list[WalEvent] | list[ProjectionWrite]:
        """Dead-letter the batch's poison, fold the rest, dead-letter what the plug-in rejects."""
        if len(msgs) == 1 and first == self._failing_seq and self._failures >= self.max_deliver:
            await self._dead_letter(
                msgs[0], "max_deliver", f"failed {self._failures} times in {self.durable}", per_consumer=True
            )
            return []
        events = await self._split(msgs)
        if events:
            rejected = await self._dispatch(events)
            if rejected:
                by_seq = {stream_seq(m): m for m in msgs}
                for r in rejected:
                    await self._dead_letter(by_seq[r.seq], r.reason, r.detail, per_consumer=True)
        return events

    async def run(self, stop: asyncio.Event) -> None:
        """Pump until ``stop``; never gives up on its own (a pump that died would leave its shard leased but unfolded)."""
        sub: JetStreamContext.PullSubscription | None = None
        self._stop = stop
        self.log.info("pump.started")
        size = min(100, self.max_batch)
        redo: int | None = None
        try:
            while not stop.is_set():
                try:
                    if sub is None:
                        sub = await self._subscribe(redo)
                        redo = None
                    size, redo = await self.run_once(sub, size)
                    if redo is not None:
                        old, sub = sub, None
                        await old.unsubscribe()
                except (nats.errors.Error, asyncio.TimeoutError, ConnectionError) as e:
                    # NATS is briefly away, or a clustered consumer is not ready yet (its create or delete
                    # timed out): nothing past the last ack was acked, so resubscribe from there.
                    self.log.warning("pump.nats_error", error=repr(e))
                    sub = None
                    await asyncio.sleep(0.5)
                except Exception as e:  # e.g. a dead letter that could not be stored: try again, never die
                    self.log.error("pump.error", error=repr(e))
                    sub = None
                    await asyncio.sleep(2.0)
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection may already be gone
                    pass
            self.log.info("pump.stopped")
