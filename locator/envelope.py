"""Event envelope v1: the JSON every producer, in any language, puts on a WAL subject.

>>> env = new_event(tenant="acme", project="web", execution_id="42", type="user.note", payload={"hi": 1})
>>> decode_envelope(encode_envelope(env)) == env
True
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import msgspec

from locator.errors import LocatorError
from locator.names import check_execution_id, check_name, check_step
from locator.shard import shard_for
from locator.subjects import parse_wal_subject, wal_subject

ENVELOPE_VERSION = 1
DEFAULT_PAYLOAD_CAP = 64 * 1024

KNOWN_TYPES = frozenset(
    {
        "execution.requested",
        "execution.started",
        "step.enter",
        "command.issued",
        "command.claimed",
        "step.exit",
        "command.completed",
        "call.error",
        "step.retry",
        "step.failed",
        "callback.waiting",
        "callback.received",
        "execution.cancel_requested",
        "execution.cancelled",
        "execution.completed",
        "execution.failed",
    }
)
USER_TYPE_RE = re.compile(r"^user\.[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63}){0,7}$")
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_:.-]{1,128}$")


# Why a message is poison: the reason a dead letter is filed under (``dlq.<shard>.<reason>``).
NOT_UTF8 = "not_utf8"  # bytes that are not UTF-8 (in a key, a value, anywhere)
NOT_JSON = "not_json"  # UTF-8, but not one JSON document (trailing data, a BOM, a bad escape, a lone surrogate…)
TOO_DEEP = "too_deep"  # nested deeper than MAX_DEPTH
INVALID_ENVELOPE = "invalid_envelope"  # JSON, but not a valid v1 envelope
SUBJECT_MISMATCH = "subject_mismatch"  # a valid envelope on a subject that disagrees with it
TOO_LARGE = "too_large"  # a payload over the cap
POISON_REASONS = frozenset({NOT_UTF8, NOT_JSON, TOO_DEEP, INVALID_ENVELOPE, SUBJECT_MISMATCH, TOO_LARGE})

# The deepest nesting a payload may have (the payload object itself is level 1). Everything that walks a
# payload (the scrub, summaries, the fold's copies) then stays far from Python's recursion limit.
MAX_DEPTH = 64
MAX_ATTEMPT = 2**31 - 1  # an int32 in every language a consumer may be written in


class EnvelopeError(LocatorError):
    """An envelope is malformed; ``field`` names the offending field (``"$"`` for the whole document).

    ``reason`` is one of :data:`POISON_REASONS`: what a dead letter of this message is filed under.
    """

    def __init__(self, message: str, *, field: str, reason: str = INVALID_ENVELOPE) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class PayloadTooLarge(EnvelopeError):
    """The payload is over the cap: store it in object storage and send a ``result_ref`` instead."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the {cap}-byte cap: store large data in object storage "
            "and send its URN as result_ref",
            field="payload",
            reason=TOO_LARGE,
        )
        self.size = size
        self.cap = cap


class SubjectMismatch(EnvelopeError):
    """The subject an event arrived on disagrees with its envelope."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field, reason=SUBJECT_MISMATCH)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One event. Unknown fields are tolerated; missing required ones are errors."""

    v: int
    event_id: str
    execution_id: str
    tenant: str
    project: str
    type: str
    ts: str
    affinity: str = ""
    step: str | None = None
    attempt: int | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    result_ref: str | None = None
    causation_id: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def now_ts() -> str:
    """UTC now as ``2026-11-22T08:00:00.000Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id() -> str:
    return uuid.uuid4().hex


def check_type(value: str) -> str:
    if value in KNOWN_TYPES or USER_TYPE_RE.fullmatch(value):
        return value
    raise EnvelopeError(
        f"unknown event type {value!r}: use one of the runtime's types or 'user.<name>'", field="type"
    )


@lru_cache(maxsize=65536)
def _check_location(tenant: str, project: str, affinity: str) -> None:
    # A producer sends many events per tenant/project: check each name once (errors are not cached).
    check_name("tenant", tenant)
    check_name("project", project)
    check_name("affinity", affinity, allow_empty=True)


def validate_envelope(env: Envelope) -> Envelope:
    """Check every field's rule; raise :class:`EnvelopeError` naming the first bad field."""
    if env.v != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version v={env.v!r} (this runtime reads v=1)", field="v")
    if EVENT_ID_RE.fullmatch(env.event_id) is None:
        raise EnvelopeError(
            f"invalid event_id {env.event_id!r}: 1-128 characters of letters, digits, '_', ':', '.', '-'",
            field="event_id",
        )
    try:
        check_execution_id(env.execution_id)
        _check_location(env.tenant, env.project, env.affinity)
        if env.step is not None:
            check_step(env.step)
    except LocatorError as e:
        raise EnvelopeError(str(e), field=getattr(e, "field", "$")) from e
    check_type(env.type)
    if env.attempt is not None and not 1 <= env.attempt <= MAX_ATTEMPT:
        raise EnvelopeError(f"attempt must be between 1 and {MAX_ATTEMPT}, got {str(env.attempt)[:24]}", field="attempt")
    try:
        parsed = datetime.fromisoformat(env.ts)
    except ValueError as e:
        raise EnvelopeError(f"ts {env.ts!r} is not an ISO-8601 timestamp", field="ts") from e
    if parsed.tzinfo is None:
        raise EnvelopeError(f"ts {env.ts!r} has no timezone (use UTC, e.g. 2026-11-22T08:00:00.000Z)", field="ts")
    return env


def new_event(
    *,
    tenant: str,
    project: str,
    execution_id: str,
    type: str,
    affinity: str = "",
    step: str | None = None,
    attempt: int | None = None,
    payload: dict[str, Any] | None = None,
    result_ref: str | None = None,
    causation_id: str | None = None,
    event_id: str | None = None,
    ts: str | None = None,
) -> Envelope:
    """A validated v1 envelope with a fresh ``event_id`` and ``ts`` unless given."""
    return validate_envelope(
        Envelope(
            v=ENVELOPE_VERSION,
            event_id=event_id or new_event_id(),
            execution_id=execution_id,
            tenant=tenant,
            project=project,
            affinity=affinity,
            type=type,
            step=step,
            attempt=attempt,
            ts=ts or now_ts(),
            payload=payload if payload is not None else {},
            result_ref=result_ref,
            causation_id=causation_id,
        )
    )


def _nesting_over(data: bytes, limit: int) -> bool:
    """Whether a JSON document nests deeper than ``limit`` containers below its top level.

    Counting brackets in C first keeps the common case (a small payload) free of any walk.
    """
    if data.count(b"{") + data.count(b"[") <= limit + 1:
        return False
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit + 1:
                    return True
        elif byte in (0x7D, 0x5D):  # } ]
            depth -= 1
    return False


def _too_deep() -> EnvelopeError:
    return EnvelopeError(f"payload is nested more than {MAX_DEPTH} levels deep", field="payload", reason=TOO_DEEP)


def encode_envelope(env: Envelope, *, payload_cap: int = DEFAULT_PAYLOAD_CAP) -> bytes:
    """JSON bytes of ``env``; raises :class:`PayloadTooLarge` when the payload is over the cap.

    A payload nested deeper than :data:`MAX_DEPTH` is refused too (``too_deep``): consumers would dead-letter it.
    """
    data = _encoder.encode(env)
    # The payload is part of data, so only a large message needs the exact payload size.
    if len(data) > payload_cap:
        size = len(_encoder.encode(env.payload))
        if size > payload_cap:
            raise PayloadTooLarge(size, payload_cap)
    if _nesting_over(data, MAX_DEPTH):
        raise _too_deep()
    return data


_FIELD_IN_MSG = re.compile(r"`\$\.([A-Za-z_]+)")
_MISSING_FIELD = re.compile(r"missing required field `([A-Za-z_]+)`")


def decode_envelope(data: bytes | str) -> Envelope:
    """Decode and validate; raise :class:`EnvelopeError` naming the field on any problem.

    Total: any input either decodes into a valid envelope or raises
    :class:`EnvelopeError` with a ``reason`` — never another exception.

    >>> try:
    ...     decode_envelope(b'{"payload": {"i": "' + bytes([0xFF, 0xFE]) + b'"}}')
    ... except EnvelopeError as e:
    ...     print(e.reason)
    not_utf8
    """
    try:
        if isinstance(data, str):
            data = data.encode()  # a str with a lone surrogate cannot be UTF-8: UnicodeEncodeError below
        env = _decoder.decode(data)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _FIELD_IN_MSG.search(msg) or _MISSING_FIELD.search(msg)
        raise EnvelopeError(f"invalid envelope: {msg}", field=m.group(1) if m else "$") from e
    except msgspec.DecodeError as e:
        raise EnvelopeError(f"envelope is not valid JSON: {e}", field="$", reason=NOT_JSON) from e
    except UnicodeError as e:
        raise EnvelopeError(f"envelope is not UTF-8: {e}", field="$", reason=NOT_UTF8) from e
    except RecursionError as e:
        raise EnvelopeError(f"envelope is nested too deep to decode: {e}", field="$", reason=TOO_DEEP) from e
    except Exception as e:  # total by contract: whatever else the decoder raises, the message is poison
        raise EnvelopeError(f"envelope cannot be decoded: {type(e).__name__}: {e}", field="$") from e
    if _nesting_over(data, MAX_DEPTH):
        raise _too_deep()
    return validate_envelope(env)


def envelope_from_dict(data: dict[str, Any], *, fill: bool = False) -> Envelope:
    """Validate a mapping (from a CLI flag or a JSON-lines file) into an envelope.

    With ``fill``, a missing ``v``, ``event_id`` or ``ts`` is filled in.
    """
    if fill:
        data = {"v": ENVELOPE_VERSION, "event_id": new_event_id(), "ts": now_ts(), **data}
    try:
        env = msgspec.convert(data, Envelope)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _FIELD_IN_MSG.search(msg) or _MISSING_FIELD.search(msg)
        raise EnvelopeError(f"invalid envelope: {msg}", field=m.group(1) if m else "$") from e
    except RecursionError as e:
        raise _too_deep() from e
    return validate_envelope(env)


def subject_for(env: Envelope, shard_count: int) -> str:
    """The WAL subject ``env`` belongs on."""
    shard = shard_for(env.tenant, env.project, env.affinity, shard_count)
    return wal_subject(shard, env.tenant, env.project, env.execution_id, env.type)


def check_subject(subject: str, env: Envelope, *, shard_count: int | None = None) -> None:
    """Raise :class:`SubjectMismatch` unless ``subject`` and ``env`` agree.

    Tenant, project, execution id and type must match; with ``shard_count`` the
    shard token must also be the one the locator computes.
    """
    if shard_count is not None and subject == subject_for(env, shard_count):
        return  # the common case: exactly the subject the locator builds, so every check holds
    try:
        parts = parse_wal_subject(subject)
    except LocatorError as e:
        raise SubjectMismatch(str(e), field="$subject") from e
    for field, on_subject, in_env in (
        ("tenant", parts.tenant, env.tenant),
        ("project", parts.project, env.project),
        ("execution_id", parts.execution_id, env.execution_id),
        ("type", parts.type, env.type),
    ):
        if on_subject != in_env:
            raise SubjectMismatch(
                f"subject {subject!r} says {field}={on_subject!r} but the envelope says {in_env!r}", field=field
            )
    if shard_count is not None:
        expected = shard_for(env.tenant, env.project, env.affinity, shard_count)
        if parts.shard != expected:
            raise SubjectMismatch(
                f"subject {subject!r} is on shard {parts.shard} but {env.tenant}/{env.project}"
                f"{'/' + env.affinity if env.affinity else ''} belongs to shard {expected} of {shard_count}",
                field="shard",
            )


def decode_wal_message(subject: str, data: bytes, *, shard_count: int) -> Envelope:
    """Decode a message read from a WAL stream; raise :class:`EnvelopeError` if it is poison.

    Poison = not JSON, not a valid v1 envelope, or a subject that disagrees with
    its envelope. The kernel pump (dead-letters it) and replay (skips it) share
    this one definition, so a replay folds exactly the events the pump folded.
    """
    env = decode_envelope(data)
    check_subject(subject, env, shard_count=shard_count)
    return env


def poison_reason(error: EnvelopeError) -> str:
    """The reason code a dead letter is filed under: one of :data:`POISON_REASONS`."""
    return error.reason
