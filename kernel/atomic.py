"""Atomic batch publish onto one WAL stream (nats-server 2.12+, ADR-50).

A batch is up to the server's limit (1,000 by default) of messages to one
stream, each carrying ``Nats-Batch-Id`` and ``Nats-Batch-Sequence``; the last
one also carries ``Nats-Batch-Commit: 1`` and is the only one sent with a
reply subject. The server stages the batch and, on the commit, checks every
message (``Nats-Msg-Id`` against the duplicate window and within the batch,
``Nats-Expected-Stream``, size limits) before storing all of them, in order,
at consecutive sequences, or none; it answers the commit alone with the last
sequence and the batch's message count. One duplicate ``Nats-Msg-Id`` rejects
the whole batch (error 10201): the producer then publishes that batch's
events one by one, as without batches, so each still gets its own answer.

The stream must allow it (``allow_atomic``); whether one does is asked once
per connection and stream (:func:`atomic_allowed`) and remembered, like the
server's batch size limit when a batch is refused as too large.

Commits are answered on one wildcard inbox per connection (:func:`replies`),
not through nats-py's ``publish_async``: its future stays pending forever when
the server answers with an error (nats-io/nats.py#985), and a refused batch is
the common case of a re-publish. The producer's one-by-one publishes use the
same inbox, for the same reason.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

log = structlog.get_logger("noetl.kernel.atomic")

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"

# nats-server's defaults (server/stream.go): messages per batch, open batches per stream.
SERVER_MAX_BATCH = 1000
SERVER_MAX_INFLIGHT_PER_STREAM = 50

# nats-server's error codes (server/errors.json) that change what the producer does next.
ERR_ATOMIC_DISABLED = 10174
ERR_BATCH_TOO_LARGE = 10199

T = TypeVar("T")


def _api_error(err: dict[str, Any]) -> APIError:
    # nats-py's from_error raises the typed error (BadRequestError, ...) instead of returning it.
    try:
        APIError.from_error(err)
    except APIError as e:
        return e
    return APIError(**err)  # pragma: no cover - from_error always raises


class _Answer(msgspec.Struct):
    """The server's answer to a publish: an ack (``batch``/``count`` for an atomic commit) or an error."""

    stream: str | None = None
    seq: int | None = None
    domain: str | None = None
    duplicate: bool | None = None
    batch: str | None = None
    count: int | None = None
    error: dict[str, Any] | None = None


# Every answer (a one-by-one publish's, a batch's commit) is decoded here: once per event, so msgspec, not json.loads
# and a dataclass built by introspection.
_answer_decoder = msgspec.json.Decoder(_Answer)


class Replies:
    """Answers to publishes on one ``<inbox>.*`` subscription, each routed to its future by the last token.

    >>> # reply, fut = await replies(js).reply_to(nc); await nc.publish(subject, data, reply=reply)
    >>> # ack = await fut  # a PubAck, or the server's refusal raised as nats-py's APIError subclass
    """

    def __init__(self) -> None:
        self.prefix = ""
        self.futures: dict[str, asyncio.Future[PubAck]] = {}
        self._tokens = itertools.count(1)
        self._ready: asyncio.Lock | None = None

    async def reply_to(self, nc: Client) -> tuple[str, asyncio.Future[PubAck]]:
        if not self.prefix:
            self._ready = self._ready or asyncio.Lock()
            async with self._ready:
                if not self.prefix:
                    prefix = nc.new_inbox()
                    await nc.subscribe(f"{prefix}.*", cb=self._answer)
                    self.prefix = prefix
        token = str(next(self._tokens))
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self.futures[token] = fut
        fut.add_done_callback(lambda _: self.futures.pop(token, None))
        return f"{self.prefix}.{token}", fut

    async def _answer(self, msg: Msg) -> None:
        fut = self.futures.get(msg.subject.rsplit(".", 1)[-1])
        if fut is None or fut.done():
            return  # given up on (timed out, cancelled)
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(NoStreamResponseError())
            return
        try:
            got = _answer_decoder.decode(msg.data)
            if got.error is not None:
                fut.set_exception(_api_error(got.error))
            elif got.stream is None or got.seq is None:
                raise ValueError(f"neither an ack nor an error: {msg.data[:200]!r}")
            else:
                fut.set_result(PubAck(stream=got.stream, seq=got.seq, domain=got.domain, duplicate=got.duplicate,
                                      batch_id=got.batch, batch_size=got.count))  # fmt: skip
        except (ValueError, TypeError, KeyError, msgspec.DecodeError) as e:
            fut.set_exception(nats.errors.Error(f"unreadable answer to a publish: {e!r}"))


@dataclass
class _Learnt:
    allowed: dict[str, bool] = field(default_factory=dict)
    max_batch: int = SERVER_MAX_BATCH
    replies: Replies = field(default_factory=Replies)


# Per connection (a Producer is often built per request; the connection lives on).
_learnt: weakref.WeakKeyDictionary[Any, _Learnt] = weakref.WeakKeyDictionary()


def _conn(js: JetStreamContext) -> Client:
    return js._nc


def _for(js: JetStreamContext) -> _Learnt:
    key = _conn(js)
    found = _learnt.get(key)
    if found is None:
        found = _learnt[key] = _Learnt()
    return found


def replies(js: JetStreamContext) -> Replies:
    """The answers inbox of ``js``'s connection."""
    return _for(js).replies


async def send_batch(
    js: JetStreamContext, messages: Sequence[tuple[str, bytes, dict[str, str]]], batch_id: str
) -> asyncio.Future[PubAck]:
    """Publish ``messages`` (subject, data, headers) as one atomic batch; the future is the commit's answer.

    Every message but the last goes without a reply subject (the server then
    answers nothing for it); the last carries the commit and a reply subject.
    Raises nats-py's errors if the connection refuses a message (then nothing
    was committed: the server drops a staged batch after its timeout).
    """
    nc = _conn(js)
    count = len(messages)
    for k in range(count - 1):
        subject, data, headers = messages[k]
        await nc.publish(subject, data, headers=batch_headers(headers, batch_id, k + 1, commit=False))
    subject, data, headers = messages[-1]
    reply, fut = await _for(js).replies.reply_to(nc)
    try:
        await nc.publish(subject, data, reply=reply, headers=batch_headers(headers, batch_id, count, commit=True))
    except BaseException:
        fut.cancel()
        raise
    return fut


async def atomic_allowed(js: JetStreamContext, stream: str, *, timeout: float) -> bool:
    """Whether ``stream`` allows atomic batch publish; asked once per connection, then remembered.

    A stream that cannot be read (missing, a timeout) counts as not allowing it
    this time and is asked again next time: the one-by-one path then reports
    the real problem per event.
    """
    learnt = _for(js)
    known = learnt.allowed.get(stream)
    if known is not None:
        return known
    try:
        info = await js.stream_info(stream)
    except (APIError, nats.errors.Error, TimeoutError) as e:
        log.debug("atomic.unknown", stream=stream, error=repr(e))
        return False
    allowed = bool(getattr(info.config, "allow_atomic", False))
    learnt.allowed[stream] = allowed
    if not allowed:
        log.info("atomic.not_allowed", stream=stream, hint="events go one by one; see docs/architecture.md")
    return allowed


def max_batch(js: JetStreamContext) -> int:
    """Messages per batch this connection's server accepts (its default until a refusal said otherwise)."""
    return _for(js).max_batch


def learn_refusal(js: JetStreamContext, stream: str, error: APIError) -> None:
    """Remember what a refused batch taught: atomic publish turned off, or a lower batch size limit."""
    learnt = _for(js)
    if error.err_code == ERR_ATOMIC_DISABLED:
        learnt.allowed[stream] = False
        log.warning("atomic.disabled", stream=stream)
    elif error.err_code == ERR_BATCH_TOO_LARGE:
        limit = re.search(r"(\d+)\s*$", error.description or "")
        if limit and 1 <= int(limit.group(1)) < learnt.max_batch:
            learnt.max_batch = int(limit.group(1))
            log.warning("atomic.max_batch", stream=stream, max_batch=learnt.max_batch)


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in consecutive chunks of at most ``size``, as even as possible (1,500 → 750 + 750)."""
    if not items:
        return []
    count = -(-len(items) // size)
    base, extra = divmod(len(items), count)
    out: list[Sequence[T]] = []
    start = 0
    for k in range(count):
        end = start + base + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def new_batch_id() -> str:
    """A short id (11 characters; the server allows 64): it is stored in every message's headers."""
    return secrets.token_urlsafe(8)


def batch_headers(headers: dict[str, str], batch_id: str, seq: int, *, commit: bool) -> dict[str, str]:
    headers[BATCH_ID] = batch_id
    headers[BATCH_SEQUENCE] = str(seq)
    if commit:
        headers[BATCH_COMMIT] = "1"
    return headers


def committed_seqs(ack: PubAck, *, stream: str, batch_id: str, count: int) -> range | None:
    """The stream sequences of a committed batch's messages, in order, or None if ``ack`` is not its commit.

    A committed batch is stored at consecutive sequences ending at ``ack.seq``
    (the server holds the stream for the whole commit). An answer without the
    batch's id and count (a server that ignored the batch headers) proves only
    the last message: the caller publishes the others again one by one.
    """
    if ack.stream != stream or ack.batch_id != batch_id or ack.batch_size != count or ack.seq < count:
        return None
    return range(ack.seq - count + 1, ack.seq + 1)
