"""The edge's error root, its typed subclasses, and the one RFC 9457 problem+json handler."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

PROBLEM = "application/problem+json"
log = structlog.get_logger("noetl.edge")


class EdgeError(Exception):
    """Root of every error the edge answers with a problem document."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class BadRequest(EdgeError):
    status, title = 400, "Bad Request"


class Unauthorized(EdgeError):
    status, title = 401, "Unauthorized"


class Forbidden(EdgeError):
    status, title = 403, "Forbidden"


class NotFound(EdgeError):
    status, title = 404, "Not Found"


def unknown_execution(execution_id: str, tenant: str, project: str, affinity: str, *, then: str = "") -> NotFound:
    """The 404 of an execution that is not on the shard its tenant, project and affinity name.

    The affinity is part of the shard key, so an execution started with one is found only when asked with it;
    the detail says which affinity was asked for (or that none was), and how to ask with one.

    >>> str(unknown_execution("42", "acme", "web", ""))
    'unknown execution 42 of acme/web (asked without an affinity: if it was started with one, ask with ?affinity=<a>)'
    >>> str(unknown_execution("42", "acme", "web", "eu", then="start it first"))
    "unknown execution 42 of acme/web with affinity 'eu' (an execution is found only with the affinity it was started with); start it first"
    """
    if affinity:
        detail = f"unknown execution {execution_id} of {tenant}/{project} with affinity {affinity!r} " \
                 "(an execution is found only with the affinity it was started with)"
    else:
        detail = f"unknown execution {execution_id} of {tenant}/{project} " \
                 "(asked without an affinity: if it was started with one, ask with ?affinity=<a>)"
    return NotFound(detail + (f"; {then}" if then else ""))


class PayloadTooLarge(EdgeError):
    status, title = 413, "Content Too Large"


class Unprocessable(EdgeError):
    status, title = 422, "Unprocessable Content"


class Unavailable(EdgeError):
    status, title = 503, "Service Unavailable"


class BadGateway(EdgeError):
    status, title = 502, "Bad Gateway"


class GatewayTimeout(EdgeError):
    status, title = 504, "Gateway Timeout"


_encoder = msgspec.json.Encoder()


def problem(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    return Response(_encoder.encode(body), status_code=status, media_type=PROBLEM, headers=headers)


async def handle_edge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeError)
    return problem(exc.status, exc.title, exc.detail, request.url.path, exc.headers, **exc.extra)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 for unknown routes also answer as problems.
    assert isinstance(exc, HTTPException)
    title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
    headers = dict(exc.headers) if exc.headers else None
    return problem(exc.status_code, title, str(exc.detail), request.url.path, headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    params = request.path_params
    log.error(
        "http.unexpected_error",
        route=request.url.path,
        execution_id=params.get("execution_id"),
        error=repr(exc),
        exc_info=exc,
    )
    return problem(500, "Internal Server Error", "an unexpected error occurred; it was logged", request.url.path)
