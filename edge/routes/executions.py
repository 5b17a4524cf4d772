"""Executions: start, publish events, read the projection, page the history."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import (
    BadGateway,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
    unknown_execution,
)
from edge.openapi import AFFINITY, AFTER_SEQ, AS_OF_SEQ, LIMIT, MIN_SEQ, Media, Param, operation
from edge.responses import convert, json_response, read_json
from edge.routes.playbooks import Conflict, latest_of
from edge.state import EdgeState, state_of
from edge.idempotency import (
    MAX_KEY,
    BadIdempotencyKey,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyStore,
    StartRecord,
    check_key,
    start_digest,
)
from edge.idempotency import Start as IdempotentStart
from kernel.producer import Ack, Producer
from locator.envelope import (
    EVENT_ID_RE,
    KNOWN_TYPES,
    MAX_ATTEMPT,
    USER_TYPE_RE,
    Envelope,
    EnvelopeError,
    encode_envelope,
    envelope_from_dict,
)
from locator.envelope import PayloadTooLarge as PayloadOverCap
from locator.names import STEP_PATTERN, check_execution_id, check_name
from locator.shard import shard_for
from locator.urn import Urn
from projector.projection import Projection
from projector.replay import history
from system_playbooks.orchestrate.playbook import PATH_PATTERN
from system_playbooks.orchestrate.start import UnknownPlaybook, requested_event, resolve_playbook

BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"


class PlaybookRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A start request's playbook: a path of the catalog and a version (the latest when None)."""

    path: Annotated[str, msgspec.Meta(pattern=PATH_PATTERN, max_length=255)]
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None


class StartRequest(msgspec.Struct, forbid_unknown_fields=True):
    playbook: PlaybookRef | None = None
    workload: dict[str, Any] = msgspec.field(default_factory=dict)
    # The name rule is checked by the handler (its own 422 message); the pattern only documents it.
    affinity: Annotated[str, msgspec.Meta(extra_json_schema={"pattern": AFFINITY.schema["pattern"]})] = ""


class PlaybookVersion(msgspec.Struct, frozen=True):
    path: str
    version: int


class Started(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A start's answer; ``playbook`` only when the request named one."""

    execution_id: str
    urn: str
    seq: int
    stream: str
    event_id: str
    playbook: PlaybookVersion | None = None


EVENT_TYPE_PATTERN = "^(" + "|".join(re.escape(t) for t in sorted(KNOWN_TYPES)) + "|" + USER_TYPE_RE.pattern[1:-1] + ")$"


class NewEvent(msgspec.Struct, kw_only=True):
    """An event to publish: ``type`` at least; the URL fills tenant, project, execution_id and affinity, and a
    missing ``v``, ``event_id`` or ``ts`` is filled in. The schema of the body (the rules are the envelope's,
    :func:`locator.envelope.validate_envelope`, which the handler applies)."""

    type: Annotated[str, msgspec.Meta(pattern=EVENT_TYPE_PATTERN)]
    step: Annotated[str, msgspec.Meta(pattern=STEP_PATTERN)] | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPT)] | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    result_ref: str | None = None
    causation_id: str | None = None
    event_id: Annotated[str, msgspec.Meta(pattern=EVENT_ID_RE.pattern)] | msgspec.UnsetType = msgspec.UNSET
    ts: Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})] | msgspec.UnsetType = msgspec.UNSET
    v: Literal[1] = 1


class EventBatch(msgspec.Struct):
    events: list[NewEvent]


class Published(msgspec.Struct):
    acks: list[Ack]


class SeqEvent(msgspec.Struct):
    seq: int
    event: Envelope


class EventsPage(msgspec.Struct):
    events: list[SeqEvent]
    next_after_seq: int | None


EVENTS_BODY = Media({"application/json": {"anyOf": [NewEvent, {"type": "array", "items": NewEvent, "minItems": 1}, EventBatch]}})


def _names(request: Request) -> tuple[str, str, str]:
    p = request.path_params
    tenant = check_name("tenant", p["tenant"])
    project = check_name("project", p["project"])
    affinity = check_name("affinity", request.query_params.get("affinity", ""), allow_empty=True)
    return tenant, project, affinity


def _int_param(request: Request, name: str, *, default: int | None = None, low: int = 0, high: int = 2**63 - 1) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # isdigit() alone accepts '²' (int() then raises: a 500) and other non-ASCII digits; int() of
    # thousands of digits raises too, so the length is checked first.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not low <= int(raw) <= high:
        raise Unprocessable(f"query parameter {name!r} must be an integer from {low} to {high}, got {raw!r}", field=name)
    return int(raw)


def _paging(request: Request) -> tuple[int, int]:
    """``after_seq`` (default 0) and ``limit`` (1..1000, default 100) of a paged history route."""
    after_seq = _int_param(request, "after_seq", default=0) or 0
    return after_seq, _int_param(request, "limit", default=100, low=1, high=1000) or 100


def _execution_url(tenant: str, project: str, execution_id: str, affinity: str) -> str:
    url = f"/api/v1/tenants/{tenant}/projects/{project}/executions/{execution_id}"
    return url + (f"?affinity={affinity}" if affinity else "")


async def _resolve(state: EdgeState, tenant: str, project: str, ref: PlaybookRef) -> dict[str, Any]:
    """The registered version ``ref`` names, as ``{"path", "version"}``; 404 naming the field when there is none.

    The version goes into ``execution.requested``, so what runs is what was checked here, whatever is registered
    after (versions are immutable). Usually no round trip: the edge remembers the catalog's ``latest`` pointers
    and follows their moves (:mod:`system_playbooks.orchestrate.latest`).
    """
    try:
        return await resolve_playbook(await latest_of(state), tenant, project, ref.path, ref.version)
    except UnknownPlaybook as e:
        raise NotFound(str(e), field=e.field) from e


IDEMPOTENCY_KEY = Param(
    name="Idempotency-Key", where="header", schema={"type": "string", "pattern": f"^[ -~]{{1,{MAX_KEY}}}$"},
    description="start at most once per key (tenant and project scoped) within NOETL_IDEMPOTENCY_WINDOW (24 h): "
    "a repeat answers 200 with the first execution; the same key with another body is a 409",
)
REPLAYED = "Idempotent-Replayed"


def _idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, None without one; 400 for a bad one or several."""
    keys = request.headers.getlist("idempotency-key")
    if not keys:
        return None
    if len(keys) > 1:
        raise BadRequest(f"send one Idempotency-Key header, not {len(keys)}", field="Idempotency-Key")
    try:
        return check_key(keys[0])
    except BadIdempotencyKey as e:
        raise BadRequest(str(e), field="Idempotency-Key") from e


async def _start_once(
    state: EdgeState, tenant: str, project: str, affinity: str, key: str, req: StartRequest,
    fresh: Callable[[], Awaitable[Envelope]], again: Callable[[StartRecord], Envelope],
) -> IdempotentStart:
    digest = start_digest(playbook=None if req.playbook is None else msgspec.to_builtins(req.playbook),
                          workload=req.workload, affinity=affinity)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    producer = Producer(await state.cells.js_for_shard(shard), state.topology, payload_cap=state.payload_cap)
    try:
        # The key store is global: on the first cell, like the catalog.
        store = await state.cells.held(state.topology.cells[0].shards[0], "idempotency", IdempotencyStore.open)
        return await store.start(producer, tenant, project, key, digest=digest, fresh=fresh, again=again)
    except PayloadOverCap as e:
        raise PayloadTooLarge(str(e)) from e
    except IdempotencyConflict as e:
        raise Conflict(str(e), field="Idempotency-Key", execution_id=e.execution_id) from e
    except IdempotencyError as e:
        raise Unavailable(str(e)) from e


@operation(summary="start an execution (orchestrated when it names a playbook)", role="write",
           params=[AFFINITY, IDEMPOTENCY_KEY], body=StartRequest, body_required=False,
           responses={202: Started, 200: Started}, errors=[400, 404, 409],
           headers={202: {"Location": "the execution's URL"},
                    200: {"Location": "the execution's URL", REPLAYED: "true: an earlier request with this "
                          "Idempotency-Key started the execution"}})
async def start(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="write")
    key = _idempotency_key(request)
    body = await read_json(request, max_bytes=state.max_body)
    req = convert({} if body is None else body, StartRequest, what="start request")
    affinity = check_name("affinity", req.affinity or affinity, allow_empty=True)

    def event(execution_id: str, playbook: dict[str, Any] | None, event_id: str | None = None) -> Envelope:
        return requested_event(
            tenant=tenant, project=project, affinity=affinity, execution_id=execution_id, playbook=playbook,
            workload=req.workload, event_id=event_id,
        )

    async def fresh() -> Envelope:
        # Resolved before anything is published: an unknown playbook is a 404 now, not a failed execution later.
        playbook = None if req.playbook is None else await _resolve(state, tenant, project, req.playbook)
        return event(state.ids.next_str(), playbook)

    replayed = False
    if key is None:
        env = await fresh()
        ack = await _publish_one(state, env)
        execution_id, event_id, playbook, seq, stream = env.execution_id, env.event_id, env.payload["playbook"], ack.seq, ack.stream
    else:
        once = await _start_once(state, tenant, project, affinity, key, req, fresh,
                                 lambda r: event(r.execution_id, r.playbook, r.event_id))
        execution_id, event_id, playbook, seq, stream = (once.record.execution_id, once.record.event_id,
                                                         once.record.playbook, once.seq, once.stream)
        replayed = once.replayed
    # A POST …/events to it follows soon, usually before the kernel has folded it: known, it is not looked up.
    await state.read.remember(shard_for(tenant, project, affinity, state.topology.shard_count), tenant, project, execution_id)
    urn = str(Urn(tenant, project, execution_id, affinity))
    out = Started(execution_id=execution_id, urn=urn, seq=seq, stream=stream, event_id=event_id,
                  playbook=None if playbook is None else PlaybookVersion(playbook["path"], playbook["version"]))
    headers = {"Location": _execution_url(tenant, project, execution_id, affinity)}
    return json_response(out, status=200 if replayed else 202, headers={**headers, REPLAYED: "true"} if replayed else headers)


async def _publish_one(state: EdgeState, env: Envelope) -> Ack:
    shard = shard_for(env.tenant, env.project, env.affinity, state.topology.shard_count)
    producer = Producer(await state.cells.js_for_shard(shard), state.topology, payload_cap=state.payload_cap)
    try:
        return await producer.publish(env)
    except PayloadOverCap as e:
        raise PayloadTooLarge(str(e)) from e


def _event_docs(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and "events" in body:
        body = body["events"]
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body or not all(isinstance(d, dict) for d in body):
        raise Unprocessable("the body must be an event object, a list of them, or {\"events\": [...]}")
    return body


@operation(summary="publish events to an execution", role="write", params=[AFFINITY], body=EVENTS_BODY,
           responses={200: Published}, errors=[404, 502])
async def publish_events(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="write")
    docs = _event_docs(await read_json(request, max_bytes=state.max_body))
    envelopes: list[Envelope] = []
    errors: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        for field, want in (("tenant", tenant), ("project", project), ("execution_id", execution_id), ("affinity", affinity)):
            if field in doc and doc[field] != want:
                errors.append({"index": i, "field": field, "detail": f"{field} {doc[field]!r} disagrees with the URL ({want!r})"})
        try:
            env = envelope_from_dict(
                {**doc, "tenant": tenant, "project": project, "execution_id": execution_id, "affinity": affinity}, fill=True
            )
            encode_envelope(env, payload_cap=state.payload_cap)
            envelopes.append(env)
        except PayloadOverCap as e:
            raise PayloadTooLarge(f"event {i}: {e}") from e
        except EnvelopeError as e:
            errors.append({"index": i, "field": e.field, "detail": str(e)})
    if errors:
        raise Unprocessable(f"{len(errors)} invalid event(s); nothing was published", errors=errors)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    if not await state.read.exists(shard, tenant, project, execution_id):
        raise unknown_execution(execution_id, tenant, project, affinity, then="start it first")
    producer = Producer(await state.cells.js_for_shard(shard), state.topology, payload_cap=state.payload_cap)
    results = await producer.publish_many(envelopes)
    if not all(isinstance(r, Ack) for r in results):
        failed = sum(not isinstance(r, Ack) for r in results)
        raise BadGateway(
            f"{failed} of {len(results)} event(s) were not acknowledged by NATS; publish them again "
            "with the same event_id (duplicates are dropped)",
            acks=msgspec.to_builtins(results),
        )
    return json_response(Published([r for r in results if isinstance(r, Ack)]))


def _none_match(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag``: ``*`` or a list of tags, compared weakly (RFC 9110 13.1.2)."""
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@operation(summary="the execution's projection", role="read", params=[
    AFFINITY, MIN_SEQ, AS_OF_SEQ,
    Param(name="If-None-Match", where="header", schema={"type": "string"}, description="an ETag: 304 while unchanged"),
], responses={200: Projection, 304: None}, errors=[404, 504],
    headers={200: {"ETag": "the projection's last_seq, quoted", "X-Noetl-Source": "where it was read from"}})
async def get_projection(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    min_seq = _int_param(request, "min_seq", low=1)
    as_of_seq = _int_param(request, "as_of_seq", low=1)
    result = await state.read.read(tenant, project, affinity, execution_id, min_seq=min_seq, as_of_seq=as_of_seq)
    etag = f'"{result.projection.last_seq}"'
    headers = {"ETag": etag, "X-Noetl-Source": result.source, "Cache-Control": "no-cache"}
    if _none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return json_response(result.projection, headers=headers)


@operation(summary="a page of the execution's history", role="read", params=[AFFINITY, AFTER_SEQ, LIMIT],
           responses={200: EventsPage}, errors=[404])
async def list_events(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    after_seq, limit = _paging(request)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    js = await state.cells.js_for_shard(shard)
    page: list[SeqEvent] = []
    events = history(
        js, shard=shard, shard_count=state.topology.shard_count, tenant=tenant, project=project,
        execution_id=execution_id, after_seq=after_seq, limit=2**62, archive=state.read.archive,
    )
    async with contextlib.aclosing(events):
        async for event in events:
            page.append(SeqEvent(event.seq, event.env))
            if len(page) >= limit:
                break
    if not page and after_seq == 0:
        raise unknown_execution(execution_id, tenant, project, affinity)
    next_after = page[-1].seq if len(page) == limit else None
    return json_response(EventsPage(page, next_after))


routes = [
    Route(BASE, start, methods=["POST"]),
    Route(BASE + "/{execution_id}", get_projection, methods=["GET"]),
    Route(BASE + "/{execution_id}/events", publish_events, methods=["POST"]),
    Route(BASE + "/{execution_id}/events", list_events, methods=["GET"]),
]
