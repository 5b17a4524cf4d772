"""Steering running executions: cancel one, resume a callback step.

Both only publish an event to the execution's WAL subject with a
deterministic ``Nats-Msg-Id``; the orchestrator decides what it means. The
edge interprets nothing but the ids it needs to answer precisely (unknown,
already used, timed out).
"""

from __future__ import annotations

import hmac
from typing import Any, Literal

import msgspec

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import EdgeError, NotFound, unknown_execution
from edge.openapi import AFFINITY, Media, operation
from edge.responses import json_response, read_json
from edge.routes.executions import BASE, _names, _publish_one
from edge.state import state_of
from locator.command import parse_callback_token
from locator.envelope import EnvelopeError, decode_wal_message, envelope_from_dict
from locator.names import check_execution_id
from locator.shard import shard_for
from locator.subjects import execution_filter, wal_stream

MAX_SCAN = 1000


class Conflict(EdgeError):
    status, title = 409, "Conflict"


class CancelRequested(msgspec.Struct):
    execution_id: str
    seq: int
    duplicate: bool
    status: Literal["CANCEL_REQUESTED"] = "CANCEL_REQUESTED"


class CallbackReceived(msgspec.Struct):
    execution_id: str
    step: str
    seq: int
    status: Literal["RECEIVED"] = "RECEIVED"


@operation(summary="cancel an execution", role="write", params=[AFFINITY], responses={202: CancelRequested}, errors=[404])
async def cancel(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="write")
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    if not await state.read.exists(shard, tenant, project, execution_id):
        raise unknown_execution(execution_id, tenant, project, affinity)
    env = envelope_from_dict(
        {
            "tenant": tenant,
            "project": project,
            "affinity": affinity,
            "execution_id": execution_id,
            "type": "execution.cancel_requested",
            "event_id": f"{execution_id}:cancel",
            "payload": {"by": "edge"},
        },
        fill=True,
    )
    ack = await _publish_one(state, env)
    return json_response(CancelRequested(execution_id, ack.seq, ack.duplicate), status=202)


async def _events_of_type(
    js: JetStreamContext,
    shard: int,
    shard_count: int,
    tenant: str,
    project: str,
    execution_id: str,
    type: str,
    *,
    limit: int = MAX_SCAN,
) -> list[dict[str, Any]]:
    """The payloads of the execution's events of ``type`` (at most ``limit``), oldest first; poison skipped,
    as the pump skips it, so nothing that was never folded can answer for (or block) a callback."""
    subject = execution_filter(shard, tenant, project, execution_id)[:-1] + type
    found: list[dict[str, Any]] = []
    seq = 0
    while len(found) < limit:
        try:
            msg = await js.get_msg(wal_stream(shard), seq=seq + 1, next=True, subject=subject)
        except NotFoundError:
            break
        assert msg.seq is not None and msg.data is not None
        seq = msg.seq
        try:
            env = decode_wal_message(msg.subject or "", msg.data or b"", shard_count=shard_count)
        except EnvelopeError:
            continue
        found.append(env.payload)
    return found


@operation(summary="resume a waiting callback step with the body (any JSON)", role=None, tag="callbacks",
           body=Media({"application/json": {}}), body_required=False, responses={202: CallbackReceived}, errors=[404, 409])
async def callback(request: Request) -> Response:
    """Resume a waiting ``callback`` step with the request body; the token in the path is the credential."""
    state = state_of(request)
    token = request.path_params["token"]
    try:
        where = parse_callback_token(token)
    except ValueError:
        raise NotFound("unknown callback token") from None
    shard = shard_for(where.tenant, where.project, where.affinity, state.topology.shard_count)
    js = await state.cells.js_for_shard(shard)
    who = (js, shard, state.topology.shard_count, where.tenant, where.project, where.execution_id)
    waiting = [p for p in await _events_of_type(*who, "callback.waiting") if p.get("command_id") == where.command_id]
    # As bytes: compare_digest refuses str with non-ASCII characters, and a stored event may hold any.
    if not waiting or not hmac.compare_digest(str(waiting[-1].get("callback_id", "")).encode(), token.encode()):
        raise NotFound("unknown callback token")
    # The token is known: a body that cannot be decoded is a 400 whatever state the execution is in.
    body = await read_json(request, max_bytes=state.max_body)
    if any(p.get("command_id") == where.command_id for p in await _events_of_type(*who, "callback.received")):
        raise Conflict("this callback token was already used")
    for type, why in (
        ("execution.cancel_requested", "was cancelled"),
        ("execution.cancelled", "was cancelled"),
        ("execution.completed", "has completed"),
        ("execution.failed", "has failed"),
    ):
        if await _events_of_type(*who, type, limit=1):
            raise Conflict(f"execution {where.execution_id} {why}: the callback would resume nothing")
    timers = await _events_of_type(*who, "command.completed")
    if any(p.get("command_id") == where.command_id and p.get("timer") == "callback_timeout" for p in timers):
        raise Conflict(f"step {where.step!r} stopped waiting: its callback timed out")
    env = envelope_from_dict(
        {
            "tenant": where.tenant,
            "project": where.project,
            "affinity": where.affinity,
            "execution_id": where.execution_id,
            "type": "callback.received",
            "step": where.step,
            "attempt": where.attempt,
            "event_id": f"{where.command_id}:callback",
            "payload": {
                "command_id": where.command_id,
                "iteration": where.iteration,
                "callback_id": token,
                "payload": body,
            },
        },
        fill=True,
    )
    ack = await _publish_one(state, env)
    if ack.duplicate:
        raise Conflict("this callback token was already used")
    return json_response(CallbackReceived(where.execution_id, where.step, ack.seq), status=202)


routes = [
    Route(BASE + "/{execution_id}/cancel", cancel, methods=["POST"]),
    Route("/api/v1/callbacks/{token}", callback, methods=["POST"]),
]
