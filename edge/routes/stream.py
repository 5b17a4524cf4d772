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
from edge.routes.executions import BASE, _exists, _names
from edge.state import state_of
from kernel.scrub import scrub
from locator.envelope import EnvelopeError, decode_wal_message
from locator.names import check_execution_id
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream

_encoder = msgspec.json.Encoder()


def _resume_after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after_seq") or "0"
    # Bounded like every seq parameter: int() of thousands of digits raises, and NATS takes an int64.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > 2**63 - 2:
        raise Unprocessable(f"Last-Event-ID / after_seq must be a WAL sequence number, got {raw[:40]!r}", field="last-event-id")
    return int(raw)


async def stream(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    after = _resume_after(request)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    if not await _exists(state, shard, tenant, project, execution_id):
        raise unknown_execution(execution_id, tenant, project, affinity)
    js = await state.cells.js_for_shard(shard)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after else DeliverPolicy.ALL,
        opt_start_seq=after + 1 if after else None,
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
            while True:
                try:
                    msg = await sub.next_msg(timeout=state.sse_keepalive)
                except nats.errors.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                seq = msg.metadata.sequence.stream
                try:
                    env = decode_wal_message(msg.subject, msg.data or b"", shard_count=state.topology.shard_count)
                except EnvelopeError:
                    continue  # poison is never served (the kernel dead-letters it)
                data = _encoder.encode(scrub(msgspec.to_builtins(env)))
                yield b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, env.type.encode(), data)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the client or the connection is already gone
                pass

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


routes = [Route(BASE + "/{execution_id}/stream", stream, methods=["GET"])]
