"""Publishing envelopes straight to their shard's WAL subject.

Every message carries ``Nats-Msg-Id: <event_id>`` and ``Nats-Expected-Stream:
WAL_<shard>``, so a re-publish inside the duplicate window is acknowledged as
a duplicate and never stored twice. An event is reported as written only when
the server acknowledged it.

:meth:`Producer.publish_many` sends large groups of events bound for one
stream as atomic batches (:mod:`kernel.atomic`) where the stream allows it,
with the same per-event answers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from opentelemetry import trace

from kernel import atomic
from kernel.errors import PublishError
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, EnvelopeError, encode_envelope, validate_envelope
from locator.shard import shard_for
from locator.subjects import wal_stream, wal_subject
from locator.topology import Topology

log = structlog.get_logger("noetl.kernel.producer")
tracer = trace.get_tracer("noetl.kernel.producer")

MSG_ID = "Nats-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """The server's acknowledgement of one event: it is durable in ``stream`` at ``seq``."""

    event_id: str
    execution_id: str
    subject: str
    stream: str
    seq: int
    duplicate: bool


class Rejected(msgspec.Struct, frozen=True, kw_only=True):
    """An event of a batch that was not written: invalid (``field`` set) or never acknowledged."""

    index: int
    event_id: str
    error: str
    field: str | None = None


PublishResult = Ack | Rejected


class _Prepared(msgspec.Struct, frozen=True):
    env: Envelope
    subject: str
    stream: str
    data: bytes


_RETRYABLE = (asyncio.TimeoutError, nats.errors.Error)


def _retrieved(fut: asyncio.Future[PubAck]) -> None:
    if not fut.cancelled():
        fut.exception()


_Item = tuple[int, _Prepared]  # (index in the caller's batch, the prepared event)
_Pending = tuple[int, _Prepared, asyncio.Future[PubAck]]


def _index(item: _Item) -> int:
    return item[0]


class _Batch(NamedTuple):
    stream: str
    batch_id: str
    items: Sequence[_Item]
    future: asyncio.Future[PubAck]  # the commit's ack: the whole batch's


class Sent(NamedTuple):
    """An event queued on the connection whose ack is not waited for yet (see :meth:`Producer.send`)."""

    prepared: _Prepared
    future: asyncio.Future[PubAck] | None


class Producer:
    """Async producer of v1 envelopes onto a topology's WAL streams.

    >>> # producer = Producer(nc.jetstream(), topology)
    >>> # ack = await producer.publish(new_event(tenant="acme", project="web",
    >>> #                                        execution_id="42", type="user.note"))
    """

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        payload_cap: int = DEFAULT_PAYLOAD_CAP,
        ack_timeout: float = 5.0,
        retries: int = 3,
        retry_backoff: float = 0.25,
        window: int = 2000,
        atomic_batches: bool = True,
        atomic_min: int = 256,
        atomic_max: int = atomic.SERVER_MAX_BATCH,
        atomic_inflight: int = 8,
    ) -> None:
        self.js = js
        self.topology = topology
        self.payload_cap = payload_cap
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        # publish_many's one-by-one path waits for answers once this many are awaited on the connection.
        self.window = window
        # Atomic batches in publish_many (atomic_batches): only for at least atomic_min events to one stream (a batch has a
        # fixed cost on the server, a staging store: below a few hundred events it is slower than one by one),
        # at most atomic_max events each (the server's limit), atomic_inflight uncommitted per stream
        # (the server allows 50 per stream, shared by every publisher).
        self.atomic_batches = atomic_batches
        self.atomic_min = max(2, atomic_min)
        self.atomic_max = max(1, min(atomic_max, atomic.SERVER_MAX_BATCH))
        self.atomic_inflight = max(1, min(atomic_inflight, atomic.SERVER_MAX_INFLIGHT_PER_STREAM))

    def prepare(self, env: Envelope) -> _Prepared:
        """Validate and encode; raises :class:`EnvelopeError` before any I/O."""
        validate_envelope(env)
        data = encode_envelope(env, payload_cap=self.payload_cap)
        shard = shard_for(env.tenant, env.project, env.affinity, self.topology.shard_count)
        return _Prepared(env, wal_subject(shard, env.tenant, env.project, env.execution_id, env.type), wal_stream(shard), data)

    def _headers(self, p: _Prepared) -> dict[str, str]:
        return {MSG_ID: p.env.event_id, EXPECTED_STREAM: p.stream}

    def _ack(self, p: _Prepared, ack: PubAck) -> Ack:
        return Ack(
            event_id=p.env.event_id,
            execution_id=p.env.execution_id,
            subject=p.subject,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )

    async def _publish_prepared(self, p: _Prepared) -> Ack:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                ack = await self.js.publish(p.subject, p.data, timeout=self.ack_timeout, headers=self._headers(p))
            except APIError as e:
                raise PublishError(f"server refused event {p.env.event_id} on {p.subject}: {e.description}") from e
            except _RETRYABLE as e:
                last = e
                log.warning(
                    "publish.retry",
                    execution_id=p.env.execution_id,
                    stream=p.stream,
                    attempt=attempt + 1,
                    error=repr(e),
                )
                continue
            return self._ack(p, ack)
        if isinstance(last, NoStreamResponseError):
            raise PublishError(
                f"no stream answered for {p.subject} after {self.retries + 1} tries: {p.stream} is missing "
                "or its server is down (is the topology bootstrapped with this shard count?)"
            ) from last
        raise PublishError(
            f"event {p.env.event_id} was not acknowledged after {self.retries + 1} tries ({last!r}); "
            "it may or may not be stored: publish it again with the same event_id (duplicates are dropped)"
        ) from last

    async def publish(self, env: Envelope) -> Ack:
        """Publish one event and wait for its ack.

        Raises :class:`EnvelopeError` (invalid, nothing sent) or :class:`PublishError`.
        """
        p = self.prepare(env)
        with tracer.start_as_current_span(
            "wal.publish",
            attributes={"noetl.execution_id": env.execution_id, "noetl.subject": p.subject, "noetl.stream": p.stream},
        ):
            ack = await self._publish_prepared(p)
        log.debug(
            "publish.ack", execution_id=env.execution_id, stream=ack.stream, seq=ack.seq, duplicate=ack.duplicate
        )
        return ack

    async def send(self, env: Envelope) -> Sent:
        """Send one event without waiting for its ack; :meth:`confirm` waits for it.

        Once this returns, the event is queued on the connection ahead of anything published after it,
        so a later event to the same stream is stored after this one (one publisher, one stream: FIFO).
        Raises :class:`EnvelopeError` (invalid, nothing sent).
        """
        p = self.prepare(env)
        try:
            fut = await self._send_one(p)
        except _RETRYABLE:
            return Sent(p, None)  # not even queued: confirm() publishes it the slow way
        fut.add_done_callback(_retrieved)  # confirm() may never come (its caller failed first)
        return Sent(p, fut)

    async def _send_one(self, p: _Prepared) -> asyncio.Future[PubAck]:
        """Publish ``p`` with a reply subject on the connection's own inbox; the future is the server's answer.

        Not nats-py's ``publish_async``: its future never resolves a refusal (nats-io/nats.py#985),
        so a refused event would wait out the ack timeout and a retry.
        """
        reply, fut = await atomic.replies(self.js).reply_to(self.js._nc)
        try:
            await self.js._nc.publish(p.subject, p.data, reply=reply, headers=self._headers(p))
        except BaseException:
            fut.cancel()
            raise
        return fut

    async def confirm(self, sent: Sent) -> Ack:
        """The ack of a :meth:`send`: waited for, and re-published (same ``Nats-Msg-Id``) if it does not come."""
        return (await self.confirm_many([sent]))[0]

    async def confirm_many(self, sents: Sequence[Sent]) -> list[Ack]:
        """:meth:`confirm` of each, in order, waiting for all their answers at once (one timer, not one each).

        Raises :class:`PublishError` for the first (in order) the server refused, or that stays unacknowledged
        after the re-publish; the acks before it were confirmed.
        """
        waiting = [s.future for s in sents if s.future is not None and not s.future.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=self.ack_timeout)
        acks: list[Ack] = []
        for sent in sents:
            fut, p = sent.future, sent.prepared
            if fut is not None and fut.done() and not fut.cancelled():
                error = fut.exception()
                if error is None:
                    acks.append(self._ack(p, fut.result()))
                    continue
                if isinstance(error, APIError):
                    raise PublishError(f"server refused event {p.env.event_id} on {p.subject}: {error.description}") from error
                if not isinstance(error, _RETRYABLE):
                    raise error
            acks.append(await self._publish_prepared(p))  # no answer in time (or none asked): again, same id
        return acks

    async def publish_many(
        self, envs: Sequence[Envelope], *, on_progress: Callable[[int], None] | None = None
    ) -> list[PublishResult]:
        """Publish a batch; one result per event, in order.

        Invalid events are rejected without being sent. When at least
        ``atomic_min`` events go to one WAL stream and the stream allows it,
        they go in atomic batches (:mod:`kernel.atomic`): one ack per batch,
        every event of it stored at consecutive sequences or none. The other
        events are pipelined one by one (:meth:`_send_one`). A batch the
        server refuses (a single duplicate ``Nats-Msg-Id`` refuses it whole) or
        does not answer in time is published again one by one, so each event
        still gets its own answer. An event whose ack did not arrive in time is
        re-published (same ``Nats-Msg-Id``, so at most once in the stream) and
        rejected only if it stays unacknowledged.
        """
        results: list[PublishResult | None] = [None] * len(envs)
        prepared: list[_Item] = []
        for i, env in enumerate(envs):
            try:
                prepared.append((i, self.prepare(env)))
            except EnvelopeError as e:
                results[i] = Rejected(index=i, event_id=env.event_id, error=str(e), field=e.field)
        done = len(envs) - len(prepared)
        if on_progress and done:
            on_progress(done)

        with tracer.start_as_current_span("wal.publish_batch", attributes={"noetl.batch_size": len(envs)}) as span:
            batched, single = await self._plan(prepared)
            span.set_attribute("noetl.atomic_batches", sum(len(chunks) for chunks in batched))
            pending, retry = await self._send_each(single, on_progress)
            batches, fallback = await self._send_batches(batched, on_progress)
            waiting = [f for _, _, f in pending] + [b.future for b in batches]
            if waiting:
                await asyncio.wait(waiting, timeout=self.ack_timeout)
            retry += self._collect(pending, results)
            for batch in batches:
                fallback += self._collect_batch(batch, results)
            if fallback:
                span.set_attribute("noetl.atomic_fallback", len(fallback))
                pending, more = await self._send_each(sorted(fallback, key=_index), on_progress)
                if pending:
                    await asyncio.wait([f for _, _, f in pending], timeout=self.ack_timeout)
                retry += more + self._collect(pending, results)
            for i, p in sorted(retry, key=_index):
                try:
                    results[i] = await self._publish_prepared(p)
                except PublishError as e:
                    results[i] = Rejected(index=i, event_id=p.env.event_id, error=str(e))
                if on_progress:
                    on_progress(1)
        out = [r for r in results if r is not None]
        assert len(out) == len(envs)
        return out

    async def _plan(self, prepared: list[_Item]) -> tuple[list[list[Sequence[_Item]]], list[_Item]]:
        """Split into atomic batches (per stream, chunked at the server's limit) and events sent one by one."""
        if not self.atomic_batches:
            return [], prepared
        by_stream: dict[str, list[_Item]] = {}
        for item in prepared:
            by_stream.setdefault(item[1].stream, []).append(item)
        batched: list[list[Sequence[_Item]]] = []
        single: list[_Item] = []
        for stream, items in by_stream.items():
            if len(items) >= self.atomic_min and await atomic.atomic_allowed(self.js, stream, timeout=self.ack_timeout):
                batched.append(atomic.chunked(items, min(self.atomic_max, atomic.max_batch(self.js))))
            else:
                single.extend(items)
        if len(by_stream) > 1:
            single.sort(key=_index)
        return batched, single

    async def _send_each(
        self, items: Sequence[_Item], on_progress: Callable[[int], None] | None
    ) -> tuple[list[_Pending], list[_Item]]:
        """Pipeline one publish per event (:meth:`_send_one`); returns the answers' futures and what was not queued.

        At most ``window`` answers are awaited at once on the connection.
        """
        pending: list[_Pending] = []
        retry: list[_Item] = []

        def progressed(f: asyncio.Future[PubAck]) -> None:
            # A cancelled future is retried and counted there.
            if on_progress and not f.cancelled():
                on_progress(1)

        awaited = atomic.replies(self.js).futures
        oldest = 0
        for i, p in items:
            if len(awaited) >= self.window:
                while oldest < len(pending) and pending[oldest][2].done():
                    oldest += 1
                if oldest < len(pending):
                    await asyncio.wait([pending[oldest][2]], timeout=self.ack_timeout)
            try:
                fut = await self._send_one(p)
            except _RETRYABLE:
                retry.append((i, p))
                continue
            if on_progress:
                fut.add_done_callback(progressed)
            pending.append((i, p, fut))
        return pending, retry

    def _collect(self, pending: list[_Pending], results: list[PublishResult | None]) -> list[_Item]:
        """Fill in the acks and refusals that came; returns the events to publish again."""
        retry: list[_Item] = []
        for i, p, fut in pending:
            if not fut.done():
                fut.cancel()
                retry.append((i, p))
                continue
            exc = fut.exception()
            if exc is None:
                results[i] = self._ack(p, fut.result())
            elif isinstance(exc, APIError):
                results[i] = Rejected(index=i, event_id=p.env.event_id, error=f"server refused: {exc.description}")
            else:
                retry.append((i, p))
        return retry

    async def _send_batches(
        self, batched: list[list[Sequence[_Item]]], on_progress: Callable[[int], None] | None
    ) -> tuple[list[_Batch], list[_Item]]:
        """Send the chunks, streams taking turns, at most ``atomic_inflight`` uncommitted batches per stream.

        Returns the batches sent and the events of chunks that were not (to go one by one).
        """
        sent: list[_Batch] = []
        fallback: list[_Item] = []
        open_batches: dict[str, deque[asyncio.Future[PubAck]]] = {}
        stalled: set[str] = set()
        for chunk in (c for turn in itertools.zip_longest(*batched) for c in turn if c is not None):
            stream = chunk[0][1].stream
            queue = open_batches.setdefault(stream, deque())
            while stream not in stalled and len(queue) >= self.atomic_inflight:
                finished, _ = await asyncio.wait([queue.popleft()], timeout=self.ack_timeout)
                if not finished:
                    # The server does not answer this stream: the rest of it goes one by one (with retries).
                    stalled.add(stream)
            batch = None if stream in stalled else await self._send_batch(stream, chunk, on_progress)
            if batch is None:
                fallback.extend(chunk)
                continue
            sent.append(batch)
            queue.append(batch.future)
        return sent, fallback

    async def _send_batch(
        self, stream: str, chunk: Sequence[_Item], on_progress: Callable[[int], None] | None
    ) -> _Batch | None:
        """One atomic batch (:func:`kernel.atomic.send_batch`); None if the connection did not take it."""
        batch_id = atomic.new_batch_id()
        count = len(chunk)
        try:
            fut = await atomic.send_batch(self.js, [(p.subject, p.data, self._headers(p)) for _, p in chunk], batch_id)
        except _RETRYABLE as e:
            log.warning("publish.batch_not_sent", stream=stream, batch_id=batch_id, error=repr(e))
            return None
        if on_progress:

            def progressed(f: asyncio.Future[PubAck]) -> None:
                if not f.cancelled() and f.exception() is None:
                    if atomic.committed_seqs(f.result(), stream=stream, batch_id=batch_id, count=count) is not None:
                        on_progress(count)

            fut.add_done_callback(progressed)
        return _Batch(stream, batch_id, chunk, fut)

    def _collect_batch(self, batch: _Batch, results: list[PublishResult | None]) -> list[_Item]:
        """Fill in a committed batch's acks; returns its events if it was not committed (to go one by one)."""
        fut = batch.future
        if not fut.done():
            fut.cancel()
            log.warning("publish.batch_unanswered", stream=batch.stream, batch_id=batch.batch_id, events=len(batch.items))
            return list(batch.items)
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, APIError):
                atomic.learn_refusal(self.js, batch.stream, exc)
            # A duplicate refuses the whole batch (error 10201): expected on a re-publish, so info, not a warning.
            log.info(
                "publish.batch_refused",
                stream=batch.stream,
                batch_id=batch.batch_id,
                error=exc.description if isinstance(exc, APIError) else repr(exc),
                code=exc.err_code if isinstance(exc, APIError) else None,
            )
            return list(batch.items)
        ack = fut.result()
        seqs = atomic.committed_seqs(ack, stream=batch.stream, batch_id=batch.batch_id, count=len(batch.items))
        if seqs is None:
            log.warning("publish.batch_ack_unexpected", stream=batch.stream, batch_id=batch.batch_id, ack=repr(ack))
            return list(batch.items)
        for (i, p), seq in zip(batch.items, seqs):
            results[i] = Ack(
                event_id=p.env.event_id, execution_id=p.env.execution_id, subject=p.subject, stream=ack.stream,
                seq=seq, duplicate=False,
            )
        return []
