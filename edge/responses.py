"""JSON in and out: bounded body reading, and every JSON response through the scrub."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from edge.errors import BadRequest, PayloadTooLarge
from kernel.scrub import scrub

_encoder = msgspec.json.Encoder()


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode ``data`` (Structs allowed) after passing it through the response scrub."""
    return Response(
        _encoder.encode(scrub(msgspec.to_builtins(data))), status_code=status, media_type="application/json", headers=headers
    )


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The raw request body; 413 past ``max_bytes`` (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the {max_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body is over the {max_bytes}-byte limit")
    return bytes(body)


async def read_json(request: Request, *, max_bytes: int) -> Any:
    """The request body as JSON (None when empty); 413 past ``max_bytes``, 400 if not JSON."""
    body = await read_body(request, max_bytes=max_bytes)
    if not body:
        return None
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
