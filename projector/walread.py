"""Reading one subject filter of a WAL stream in order, without leaving consumers behind.

Most histories are short, so the first messages are read with direct gets
(``next_by_subj``): no consumer is created on the server at all. A history
longer than that goes on with an ordered consumer from the next sequence,
which is deleted as soon as the read ends. (An ordered consumer that is only
unsubscribed lives on until its inactivity threshold: under load they pile
up until the server refuses new ones with "maximum consumers limit reached".)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import NamedTuple

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from projector.errors import ProjectorError

DIRECT_FIRST = 64  # messages read with direct gets before an ordered consumer takes over
# Headers a direct get adds to the stored message's own (they describe the read, not the message).
_DIRECT_HEADERS = frozenset(
    {"Nats-Stream", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Subject", "Nats-Last-Sequence", "Nats-Num-Pending",
     "Nats-UpTo-Sequence"}
)


class StoredMessage(NamedTuple):
    """One WAL message as the stream stored it."""

    seq: int
    stored_at_ns: int
    subject: str
    headers: dict[str, str]
    data: bytes


def rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time with up to nine fractional digits.

    >>> rfc3339_ns("1970-01-01T00:00:01.000000002Z")
    1000000002
    >>> rfc3339_ns("2026-12-04T17:01:49Z") % 10**9
    0
    """
    from datetime import datetime, timezone

    body = text.rstrip("Z")
    whole, _, fraction = body.partition(".")
    seconds = int(datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp())
    return seconds * 10**9 + int((fraction + "000000000")[:9])


def position(msg: Msg) -> tuple[int, int, int]:
    """(stream sequence, messages pending, stored-at ns) of a consumer-delivered message, off its reply subject.

    The tokens ``msg.metadata`` reads (the plain and the domain form) without building its dataclasses and
    datetime for every message of a long history; anything else goes through ``msg.metadata``.

    >>> from nats.aio.msg import Msg
    >>> plain = "$JS.ACK.WAL_0.c1.1.4071.17.1763800000000000000.23"
    >>> domain = "$JS.ACK.hub.ACCHASH.WAL_0.c1.1.4071.17.1763800000000000000.23.x7"
    >>> [position(Msg(None, reply=r)) for r in (plain, domain)]
    [(4071, 23, 1763800000000000000), (4071, 23, 1763800000000000000)]
    >>> all((m.sequence.stream, m.num_pending) == (4071, 23) for m in map(Msg.Metadata._from_reply, (plain, domain)))
    True
    """
    tokens = (msg.reply or "").split(".")
    n = len(tokens)
    if tokens[0] == "$JS" and n > 1 and tokens[1] == "ACK":
        if n == 9:
            return int(tokens[5]), int(tokens[8]), int(tokens[7])
        if n >= 11:
            return int(tokens[7]), int(tokens[10]), int(tokens[9])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending, int(meta.timestamp.timestamp() * 1e9)


async def read_subject(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    after_seq: int = 0,
    until_seq: int | None = None,
    idle_timeout: float = 5.0,
    direct_first: int = DIRECT_FIRST,
    on_pending: Callable[[int, int], None] | None = None,
) -> AsyncGenerator[StoredMessage, None]:
    """The stream's messages matching ``subject`` after ``after_seq`` (up to ``until_seq``), in order.

    ``on_pending(read, pending)`` is called for each message the ordered consumer delivers (after the
    direct gets): how many were read so far and how many the server says are left.
    """
    seq = after_seq
    read = 0
    # One get past direct_first: a message there means a long history, which the consumer takes from it on.
    for i in range(direct_first + 1):
        try:
            raw = await js.get_msg(stream, seq=seq + 1, next=True, subject=subject, direct=True)
        except NotFoundError:
            return
        assert raw.seq is not None
        if until_seq is not None and raw.seq > until_seq:
            return
        if i == direct_first:
            break
        headers = {k: v for k, v in (raw.headers or {}).items() if k not in _DIRECT_HEADERS}
        stamp = (raw.headers or {}).get("Nats-Time-Stamp")
        stored = rfc3339_ns(stamp) if stamp else 0
        seq = raw.seq
        read += 1
        yield StoredMessage(raw.seq, stored, raw.subject or "", headers, raw.data or b"")
    # A long history: an ordered consumer from here, deleted when the read ends.
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=raw.seq)
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config, inactive_threshold=10.0)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except nats.errors.TimeoutError as e:
                raise ProjectorError(f"reading {subject} from {stream} stalled: no message for {idle_timeout}s") from e
            at, pending, stored = position(msg)
            if until_seq is not None and at > until_seq:
                return
            read += 1
            if on_pending is not None:
                on_pending(read, pending)
            yield StoredMessage(at, stored, msg.subject, dict(msg.headers or {}), msg.data or b"")
            if pending == 0:
                return
    finally:
        name = None
        with contextlib.suppress(Exception):
            name = (await sub.consumer_info()).name
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):  # gone already, or NATS away: the inactivity threshold ends it
                await js.delete_consumer(stream, name)
