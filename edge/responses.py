"""JSON in and out: bounded body reading, total decoding, and every JSON response through the scrub."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from edge.errors import BadRequest, PayloadTooLarge, Unprocessable
from kernel.scrub import scrub
from locator.envelope import MAX_DEPTH

# The deepest a request body may nest (the top level is 1): an event's payload of MAX_DEPTH levels inside
# its envelope inside {"events": [...]}. Deeper JSON is refused before anything walks it; a payload that
# is too deep inside a shallower body is the envelope's to refuse (422, field "payload").
MAX_BODY_DEPTH = MAX_DEPTH + 3
# A declared Content-Length longer than this many digits is over any limit (and int() of a few
# thousand digits raises).
_MAX_DIGITS = 18
T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_AT_PATH = re.compile(r" - at `\$(.*)`$", re.DOTALL)


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode ``data`` (Structs allowed) after passing it through the response scrub."""
    return Response(
        _encoder.encode(scrub(msgspec.to_builtins(data))), status_code=status, media_type="application/json", headers=headers
    )


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The raw request body; 413 past ``max_bytes`` (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit():
        if len(declared.lstrip("0")) > _MAX_DIGITS or int(declared) > max_bytes:
            raise PayloadTooLarge(f"request body is {declared[:40]} bytes, over the {max_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body is over the {max_bytes}-byte limit")
    return bytes(body)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep (a walk with a stack, not recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def decode_json(data: bytes, *, what: str = "request body") -> Any:
    """``data`` as JSON, or :class:`BadRequest` saying why not; total: no other exception for any bytes.

    The problem names the ``reason``: ``not_utf8``, ``not_json`` (trailing data, a BOM, a lone surrogate
    escape, a number out of range…) or ``too_deep`` (more than :data:`MAX_BODY_DEPTH` levels).

    >>> decode_json(b'{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> try:
    ...     decode_json(b'"\\xff"')
    ... except BadRequest as e:
    ...     print(e.extra["reason"])
    not_utf8
    """
    try:
        value = _decoder.decode(data)
    except UnicodeError as e:
        raise BadRequest(f"{what} is not UTF-8: {e}", reason="not_utf8") from e
    except RecursionError as e:
        raise BadRequest(f"{what} is nested more than {MAX_BODY_DEPTH} levels deep", reason="too_deep") from e
    except msgspec.DecodeError as e:  # a ValidationError too: a number out of range
        raise BadRequest(f"{what} is not valid JSON: {e}", reason="not_json") from e
    # Counting brackets in C first spares the common, shallow body any walk.
    if data.count(b"[") + data.count(b"{") > MAX_BODY_DEPTH and nests_deeper(value, MAX_BODY_DEPTH):
        raise BadRequest(f"{what} is nested more than {MAX_BODY_DEPTH} levels deep", reason="too_deep")
    return value


async def read_json(request: Request, *, max_bytes: int) -> Any:
    """The request body as JSON (None when empty); 413 past ``max_bytes``, 400 if it cannot be decoded."""
    body = await read_body(request, max_bytes=max_bytes)
    if not body:
        return None
    return decode_json(body)


def convert(value: Any, into: type[T], *, what: str) -> T:
    """``msgspec.convert(value, into)``, or 422 naming the field (``field``: a path such as ``workload``)."""
    try:
        return msgspec.convert(value, into)
    except msgspec.ValidationError as e:
        match = _AT_PATH.search(str(e))
        field = match.group(1).lstrip(".") if match else ""
        raise Unprocessable(f"invalid {what}: {e}", field=field or "$") from e
