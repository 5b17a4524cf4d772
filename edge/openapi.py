"""The edge's OpenAPI 3.1 document, generated from the routes' own declarations and the msgspec Structs.

Every handler declares its operation next to itself with :func:`operation`: the
role it needs, its query and header parameters, its request body and its
responses (msgspec Structs or types; ``msgspec.json.schema_components`` gives the
JSON Schema 2020-12 that OpenAPI 3.1 uses). Path parameters come from the path
itself (:data:`PATH_PARAMS`), and the errors every operation can answer
(problem+json, :class:`Problem`) are added from what it declares: 401 and 403 with
a role, 422 with a validated name in the path or a query parameter, 400 and 413
with a body, 503 when it reaches NATS. :func:`openapi` walks the app's routes, so
a route without a declaration is an error, not a hole in the contract
(a route may opt out with Starlette's ``include_in_schema=False``: the UI's pages).

>>> from starlette.applications import Starlette
>>> from starlette.responses import Response
>>> from starlette.routing import Route
>>> @operation(summary="ping", role=None, responses={204: None}, nats=False)
... async def ping(request): return Response(status_code=204)
>>> doc = openapi(Starlette(routes=[Route("/ping", ping, methods=["GET"])]))
>>> doc["openapi"], sorted(doc["paths"]["/ping"]["get"]["responses"])
('3.1.0', ['204', '500'])
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import PROBLEM
from worker.keychain import ALIAS_RE
from locator.names import INT64_MAX, NAME_PATTERN, STEP_PATTERN
from system_playbooks.orchestrate.playbook import PATH_PATTERN

Handler = Callable[[Request], Awaitable[Response]]
H = TypeVar("H", bound=Handler)
Role = Literal["read", "write", "admin"]
ATTRIBUTE = "__noetl_operation__"
log = structlog.get_logger("noetl.edge")
VERSION = "1"
REF = "#/components/schemas/{name}"
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 413: "Content Too Large",
    422: "Unprocessable Content", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


class UndeclaredRoute(Exception):
    """A route of the app has no :func:`operation` declaration (or names a path parameter no table knows)."""


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem document, every 4xx and 5xx of the edge; some carry more members (below)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    field: str | None = None  # the request field at fault (a 422)
    reason: str | None = None  # why a body could not be decoded (a 400): not_utf8, not_json, too_deep
    errors: list[dict[str, Any]] | None = None  # one entry per invalid event of a batch (a 422)
    acks: list[dict[str, Any]] | None = None  # a publish's 502: each event's ack, or why it was not written
    last_seq: int | None = None  # a read's 504: what the projection reached ...
    min_seq: int | None = None  # ... and what was asked for
    execution_id: str | None = None  # an Idempotency-Key's 409: the execution the key started
    cells: dict[str, bool] | None = None  # /readyz's 503: which cells are connected ...
    problems: list[str] | None = None  # ... and what failed


class Media(msgspec.Struct, frozen=True):
    """A body by media type: each a type (its msgspec schema) or a JSON Schema dict as it is."""

    types: dict[str, Any]


class Param(msgspec.Struct, frozen=True, kw_only=True):
    """A query or header parameter."""

    name: str
    schema: dict[str, Any]
    description: str
    where: Literal["query", "header"] = "query"
    required: bool = False


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`operation` records on a handler."""

    summary: str
    role: Role | None
    tag: str
    params: tuple[Param, ...]
    body: Any
    responses: dict[int, Any]
    errors: tuple[int, ...]
    nats: bool
    headers: dict[int, dict[str, str]]
    body_required: bool


def operation(
    *,
    summary: str,
    role: Role | None,
    responses: Mapping[int, Any],
    tag: str = "executions",
    params: Sequence[Param] = (),
    body: Any = None,
    errors: Sequence[int] = (),
    nats: bool = True,
    headers: Mapping[int, Mapping[str, str]] | None = None,
    body_required: bool = True,
) -> Callable[[H], H]:
    """Declare a handler's operation: ``role`` None means no bearer token; ``responses`` maps a status to a
    type (JSON), a :class:`Media` or None (no body); ``errors`` are the problem statuses it raises itself;
    ``nats`` False for a handler that never reaches NATS (no 503); ``headers`` the response headers by status;
    ``body_required`` False when an empty body is accepted."""
    op = Operation(
        summary=summary, role=role, tag=tag, params=tuple(params), body=body, responses=dict(responses),
        errors=tuple(errors), nats=nats, headers={k: dict(v) for k, v in (headers or {}).items()},
        body_required=body_required,
    )

    def mark(handler: H) -> H:
        setattr(handler, ATTRIBUTE, op)
        return handler

    return mark


def _int(description: str, *, low: int = 0, high: int = INT64_MAX) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


NAME: dict[str, Any] = {"type": "string", "pattern": NAME_PATTERN}
AFFINITY = Param(
    name="affinity", schema={"type": "string", "pattern": NAME_PATTERN.replace("^", "^(", 1).replace("$", ")?$")},
    description="the affinity the execution was started with (part of the shard key); empty or a name",
)
MIN_SEQ = Param(name="min_seq", schema=_int("wait (bounded) until the projection has folded this WAL seq", low=1),
                description="read-your-writes: a publish ack's seq")
AS_OF_SEQ = Param(name="as_of_seq", schema=_int("the projection as it was at this seq", low=1),
                  description="time travel: the fold of the history up to this seq")
AFTER_SEQ = Param(name="after_seq", schema=_int("start after this WAL seq"), description="paging: the previous page's next_after_seq")
LIMIT = Param(name="limit", schema=_int("page size", low=1, high=1000) | {"default": 100}, description="at most this many items")

# Path parameters by name, with the rule the handler checks (a 422 otherwise).
PATH_PARAMS: dict[str, tuple[dict[str, Any], str]] = {
    "tenant": (NAME, "tenant name"),
    "project": (NAME, "project name"),
    "execution_id": ({"type": "string", "pattern": r"^[1-9][0-9]{0,18}$"}, "execution id: a snowflake int64 in decimal"),
    "step": ({"type": "string", "pattern": STEP_PATTERN}, "step name"),
    "path": ({"type": "string", "pattern": PATH_PATTERN, "maxLength": 255}, "playbook path (may contain '/')"),
    "alias": ({"type": "string", "pattern": ALIAS_RE}, "credential alias"),
    "schedule_id": (NAME, "schedule id"),
    "token": ({"type": "string", "minLength": 1}, "the callback token of a waiting step (it is the credential)"),
}
VALIDATED = frozenset(PATH_PARAMS) - {"token"}
_CONVERTOR = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(:[a-z]+)?\}")


def declared(route: Route) -> list[tuple[str, Operation]]:
    """The (method, operation) pairs of ``route`` (HEAD, which Starlette adds to GET, left out)."""
    out: list[tuple[str, Operation]] = []
    for method in sorted((route.methods or set()) - {"HEAD"}):
        op = getattr(route.endpoint, ATTRIBUTE, None)
        if not isinstance(op, Operation):
            raise UndeclaredRoute(f"{method} {route.path} has no @operation declaration (edge/openapi.py)")
        out.append((method, op))
    return out


class _Builder:
    def __init__(self) -> None:
        self.types: list[Any] = [Problem]

    def ref(self, t: Any) -> Any:
        """A placeholder for type ``t``'s schema, resolved once every type is known (one components pass);
        a JSON Schema dict is kept, with the types inside it replaced likewise."""
        if isinstance(t, dict):
            return {k: self.ref(v) for k, v in t.items()}
        if isinstance(t, list):
            return [self.ref(v) for v in t]
        if t is None or isinstance(t, (str, int, float, bool)):
            return t
        if t not in self.types:
            self.types.append(t)
        return {"$type": self.types.index(t)}

    def content(self, body: Any) -> dict[str, Any]:
        media = body.types if isinstance(body, Media) else {"application/json": body}
        return {kind: {"schema": self.ref(t)} for kind, t in media.items()}

    def parameters(self, path: str, op: Operation) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, _ in _CONVERTOR.findall(path):
            if name not in PATH_PARAMS:
                raise UndeclaredRoute(f"path parameter {name!r} of {path} is not in edge.openapi.PATH_PARAMS")
            schema, description = PATH_PARAMS[name]
            out.append({"name": name, "in": "path", "required": True, "schema": schema, "description": description})
        for p in op.params:
            out.append({"name": p.name, "in": p.where, "required": p.required, "schema": p.schema, "description": p.description})
        return out

    def operation(self, method: str, path: str, op: Operation) -> dict[str, Any]:
        names = {n for n, _ in _CONVERTOR.findall(path)}
        statuses = set(op.errors) | {500}
        if op.role is not None:
            statuses |= {401, 403}
        if names & VALIDATED or op.params:
            statuses.add(422)
        if op.body is not None:
            statuses |= {400, 413, 422}
        if op.nats:
            statuses.add(503)
        responses: dict[str, Any] = {}
        for status, body in sorted(op.responses.items()):
            answer: dict[str, Any] = {"description": STATUS_TEXT.get(status, str(status))}
            if body is not None:
                answer["content"] = self.content(body)
            if status in op.headers:
                answer["headers"] = {h: {"description": d, "schema": {"type": "string"}} for h, d in op.headers[status].items()}
            responses[str(status)] = answer
        for status in sorted(statuses - set(op.responses)):
            problem = {PROBLEM: {"schema": self.ref(Problem)}}
            responses[str(status)] = {"description": STATUS_TEXT.get(status, str(status)), "content": problem}
        out: dict[str, Any] = {
            "operationId": method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", _CONVERTOR.sub(r"\1", path)),
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": self.parameters(path, op),
            "responses": responses,
            "security": [{"bearer": []}] if op.role is not None else [],
        }
        if op.role is not None:
            out["x-noetl-role"] = op.role
            out["description"] = f"Needs a bearer token with role {op.role!r} (or higher) for the tenant."
        if op.body is not None:
            out["requestBody"] = {"required": op.body_required, "content": self.content(op.body)}
        return out

    def resolve(self, doc: Any, schemas: tuple[dict[str, Any], ...]) -> Any:
        if isinstance(doc, dict):
            if set(doc) == {"$type"}:
                return schemas[doc["$type"]]
            return {k: self.resolve(v, schemas) for k, v in doc.items()}
        if isinstance(doc, list):
            return [self.resolve(v, schemas) for v in doc]
        return doc


def openapi(app: Starlette, *, title: str = "noetl-edge", version: str = VERSION, strict: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes (see the module doc); :class:`UndeclaredRoute` for a gap,
    or, not ``strict``, the gap left out and logged (the served document: one route's gap is no 500 for all)."""
    builder = _Builder()
    paths: dict[str, dict[str, Any]] = {}
    for route in app.routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        path = _CONVERTOR.sub(r"{\1}", route.path)
        try:
            operations = [(method, op, builder.operation(method, route.path, op)) for method, op in declared(route)]
        except UndeclaredRoute as e:
            if strict:
                raise
            log.warning("openapi.undeclared_route", error=str(e))
            continue
        for method, _, doc in operations:
            paths.setdefault(path, {})[method.lower()] = doc
    schemas, components = msgspec.json.schema_components(builder.types, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "The noetl-edge HTTP API (docs/api.md). Errors are RFC 9457 problem+json documents.",
        },
        "servers": [{"url": "/"}],
        "paths": builder.resolve(paths, schemas),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API token (docs/api.md#authentication)"}},
        },
    }
