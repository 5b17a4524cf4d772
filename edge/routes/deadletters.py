"""``GET /api/v1/dead-letters?shard=N``: a shard's poison messages (``DLQ_<shard>``), for the admin role.

Each row is one dead-letter copy as :mod:`kernel.dlq` files it: the reason and its detail, the
original stream, sequence and subject, the consumer that gave up, when it was filed, and the first
bytes of the message (as text, scrubbed like every response). Paged by the DLQ's own sequence
(``after_seq``, ``limit`` 1..500), read with direct gets: no consumer is left behind.
"""

from __future__ import annotations

import msgspec
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import Unprocessable
from edge.openapi import AFTER_SEQ, Param, operation
from edge.responses import json_response
from edge.routes.executions import _int_param
from edge.state import state_of
from kernel.dlq import DLQ_CONSUMER, DLQ_REASON, DLQ_SEQ, DLQ_STREAM, DLQ_SUBJECT
from locator.subjects import dlq_stream

PREVIEW_BYTES = 512
MAX_LIMIT = 500


class DeadLetter(msgspec.Struct, kw_only=True):
    """One dead-letter copy: why, where it came from, when it was filed, and its first bytes as text."""

    seq: int
    reason: str
    detail: str
    subject: str | None
    stream: str | None
    original_seq: int | None
    consumer: str | None
    filed_at: str | None
    size: int
    preview: str


class DeadLetters(msgspec.Struct, kw_only=True):
    shard: int
    dead_letters: list[DeadLetter]
    next_after_seq: int | None


def _row(seq: int, subject: str, headers: dict[str, str], data: bytes, filed_at: str | None) -> DeadLetter:
    reason, _, detail = headers.get(DLQ_REASON, "").partition(": ")
    original_seq = headers.get(DLQ_SEQ, "")
    return DeadLetter(
        seq=seq, reason=reason or subject.rsplit(".", 1)[-1], detail=detail, subject=headers.get(DLQ_SUBJECT),
        stream=headers.get(DLQ_STREAM),
        original_seq=int(original_seq) if original_seq.isascii() and original_seq.isdigit() and len(original_seq) < 20 else None,
        consumer=headers.get(DLQ_CONSUMER), filed_at=filed_at, size=len(data),
        preview=data[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
    )


@operation(summary="a shard's dead letters (poison messages with their reason), oldest first", role="admin", tag="system",
           params=[
               Param(name="shard", schema={"type": "integer", "minimum": 0, "maximum": 65535}, required=True,
                     description="the shard (0 to the topology's shard count - 1)"),
               AFTER_SEQ,
               Param(name="limit", schema={"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
                     description="at most this many dead letters"),
           ], responses={200: DeadLetters})
async def list_dead_letters(request: Request) -> Response:
    state = state_of(request)
    state.auth.check(request.headers.get("authorization"), tenant=None, need="admin")
    shard = _int_param(request, "shard", high=65535)
    if shard is None:
        raise Unprocessable("query parameter 'shard' is required", field="shard")
    if shard >= state.topology.shard_count:
        raise Unprocessable(f"no shard {shard}: shards are 0 to {state.topology.shard_count - 1}", field="shard")
    after_seq = _int_param(request, "after_seq", default=0) or 0
    limit = _int_param(request, "limit", default=100, low=1, high=MAX_LIMIT) or 100
    js = await state.cells.js_for_shard(shard)
    rows: list[DeadLetter] = []
    seq = after_seq
    while len(rows) < limit:
        try:
            msg = await js.get_msg(dlq_stream(shard), seq=seq + 1, next=True)
        except NotFoundError:
            break
        assert msg.seq is not None
        seq = msg.seq
        headers = dict(msg.headers or {})
        # A direct get carries the stored time as a header; the stream API's get as a field.
        filed_at = msg.time.isoformat() if msg.time is not None else headers.get("Nats-Time-Stamp")
        rows.append(_row(seq, msg.subject or "", headers, msg.data or b"", filed_at))
    return json_response(DeadLetters(shard=shard, dead_letters=rows, next_after_seq=seq if len(rows) == limit else None))


routes = [Route("/api/v1/dead-letters", list_dead_letters, methods=["GET"])]
