"""Publishing envelopes straight to their shard's WAL subject.

Every message carries ``Nats-Msg-Id: <event_id>`` and ``Nats-Expected-Stream:
WAL_<shard>``, so a re-publish inside the duplicate window is acknowledged as
a duplicate and never stored twice. An event is reported as written only when
the server acknowledged it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from opentelemetry import trace

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
    ) -> None:
        self.js = js
        self.topology = topology
        self.payload_cap = payload_cap
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        # Below nats-py's own limit of in-flight async publishes (4000), so no permit wait is needed.
        self.window = window

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
            fut = await self.js.publish_async(p.subject, p.data, headers=self._headers(p))
        except _RETRYABLE:
            return Sent(p, None)  # not even queued: confirm() publishes it the slow way
        fut.add_done_callback(_retrieved)  # confirm() may never come (its caller failed first)
        return Sent(p, fut)

    async def confirm(self, sent: Sent) -> Ack:
        """The ack of a :meth:`send`: waited for, and re-published (same ``Nats-Msg-Id``) if it does not come."""
        if sent.future is not None:
            try:
                return self._ack(sent.prepared, await asyncio.wait_for(sent.future, self.ack_timeout))
            except APIError as e:
                p = sent.prepared
                raise PublishError(f"server refused event {p.env.event_id} on {p.subject}: {e.description}") from e
            except _RETRYABLE:
                pass
        return await self._publish_prepared(sent.prepared)

    async def publish_many(
        self, envs: Sequence[Envelope], *, on_progress: Callable[[int], None] | None = None
    ) -> list[PublishResult]:
        """Pipeline a batch with ``publish_async``; one result per event, in order.

        Invalid events are rejected without being sent; events whose ack did
        not arrive in time are re-published (same ``Nats-Msg-Id``, so at most
        once in the stream) and rejected only if they stay unacknowledged.
        """
        results: list[PublishResult | None] = [None] * len(envs)
        prepared: list[tuple[int, _Prepared]] = []
        for i, env in enumerate(envs):
            try:
                prepared.append((i, self.prepare(env)))
            except EnvelopeError as e:
                results[i] = Rejected(index=i, event_id=env.event_id, error=str(e), field=e.field)
        done = len(envs) - len(prepared)
        if on_progress and done:
            on_progress(done)

        with tracer.start_as_current_span("wal.publish_batch", attributes={"noetl.batch_size": len(envs)}):
            futures: list[tuple[int, _Prepared, asyncio.Future[PubAck]]] = []
            retry: list[tuple[int, _Prepared]] = []

            def progressed(f: asyncio.Future[PubAck]) -> None:
                # A cancelled future is retried below and counted there.
                if on_progress and not f.cancelled():
                    on_progress(1)

            js = self.js
            for i, p in prepared:
                # A stall timeout costs a task and a loop turn per message on 3.11: only
                # pay for it when the in-flight window is full and a wait may really happen.
                stall = self.ack_timeout if js.publish_async_pending() >= self.window else None
                try:
                    fut = await js.publish_async(p.subject, p.data, wait_stall=stall, headers=self._headers(p))
                except _RETRYABLE:
                    retry.append((i, p))
                    continue
                if on_progress:
                    fut.add_done_callback(progressed)
                futures.append((i, p, fut))
            if futures:
                await asyncio.wait([f for _, _, f in futures], timeout=self.ack_timeout)
            for i, p, fut in futures:
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
            for i, p in sorted(retry, key=lambda item: item[0]):
                try:
                    results[i] = await self._publish_prepared(p)
                except PublishError as e:
                    results[i] = Rejected(index=i, event_id=p.env.event_id, error=str(e))
                if on_progress:
                    on_progress(1)
        out = [r for r in results if r is not None]
        assert len(out) == len(envs)
        return out
