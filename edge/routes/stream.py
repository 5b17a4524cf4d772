"""Server-Sent Events of an execution's new events; ``Last-Event-ID`` (a WAL seq) resumes without gaps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from edge.errors import Unprocessable, unknown_execution
from edge.openapi import AFFINITY, AFTER_SEQ, Media, Param, operation
from edge.routes.executions import BASE, _names
from edge.state import state_of
from kernel.scrub import scrub
from locator.envelope import EnvelopeError, decode_wal_message
from locator.names import check_execution_id
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream
from projector.archive import archived_messages

_encoder = msgspec.json.Encoder()


def _resume_after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after_seq") or "0"
    # Bounded like every seq parameter: int() of thousands of digits raises, and NATS takes an int64.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > 2**63 - 2:
        raise Unprocessable(f"Last-Event-ID / after_seq must be a WAL sequence number, got {raw[:40]!r}", field="last-event-id")
    return int(raw)


def _frame(seq: int, subject: str, data: bytes, shard_count: int) -> bytes | None:
    """One SSE event for a stored message; None for poison, which is never served (the kernel dead-letters it)."""
    try:
        env = decode_wal_message(subject, data, shard_count=shard_count)
    except EnvelopeError:
        return None
    body = _encoder.encode(scrub(msgspec.to_builtins(env)))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, env.type.encode(), body)


@operation(summary="Server-Sent Events of the execution's events (the archived ones, then live)", role="read", params=[
    AFFINITY, AFTER_SEQ,
    Param(name="Last-Event-ID", where="header", schema={"type": "string", "pattern": "^[0-9]{1,19}$"},
          description="resume after this WAL seq (what the last event's id was)"),
], responses={200: Media({"text/event-stream": {"type": "string"}})}, errors=[404])
async def stream(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    after = _resume_after(request)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    if not await state.read.exists(shard, tenant, project, execution_id):
        raise unknown_execution(execution_id, tenant, project, affinity)
    js = await state.cells.js_for_shard(shard)
    # Archived history first (what system/cleanup moved out of the WAL), then the WAL after it.
    ref, archived = await archived_messages(
        js, state.read.archive, shard=shard, tenant=tenant, project=project, execution_id=execution_id, after_seq=after
    )
    start = max(after, ref.last_seq if ref is not None else 0)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
        opt_start_seq=start + 1 if start else None,
    )
    sub = await js.subscribe(
        execution_filter(shard, tenant, project, execution_id),
        stream=wal_stream(shard),
        ordered_consumer=True,
        config=config,
        inactive_threshold=60.0,
    )

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            for m in archived:
                frame = _frame(m.seq, m.subject, m.data, state.topology.shard_count)
                if frame is not None:
                    yield frame
            while True:
                try:
                    msg = await sub.next_msg(timeout=state.sse_keepalive)
                except nats.errors.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                frame = _frame(msg.metadata.sequence.stream, msg.subject, msg.data or b"", state.topology.shard_count)
                if frame is not None:
                    yield frame
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the client or the connection is already gone
                pass

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


routes = [Route(BASE + "/{execution_id}/stream", stream, methods=["GET"])]
