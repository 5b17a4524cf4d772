"""``GET /api/v1/openapi.json``: the API as OpenAPI 3.1, generated from the routes (:mod:`edge.openapi`)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.openapi import Media, openapi, operation

_encoder = msgspec.json.Encoder()


@operation(summary="this document: the API as OpenAPI 3.1 (no token needed)", role=None, tag="system",
           responses={200: Media({"application/json": {"type": "object"}})}, nats=False)
async def openapi_json(request: Request) -> Response:
    # Built on the first request and kept: the app's routes do not change while it runs.
    doc: dict[str, Any] | None = getattr(request.app.state, "openapi", None)
    if doc is None:
        doc = request.app.state.openapi = openapi(request.app, strict=False)
    return Response(_encoder.encode(doc), media_type="application/json", headers={"Cache-Control": "no-cache"})


routes = [Route("/api/v1/openapi.json", openapi_json, methods=["GET"])]
