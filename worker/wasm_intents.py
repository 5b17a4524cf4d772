"""What a WASM plug-in asks the platform to do, checked at call time and carried out after the call.

Each host function turns the guest's bytes into one intent, or refuses them
with a negative code (nothing recorded). The formats (also in ``docs/plugins.md``):

* ``event_publish``: JSON ``{"type", "payload"?, "step"?, "tenant"?, "project"?, "execution_id"?}``.
  A user plug-in may publish only ``user.*`` events of its own execution (the
  scope fields, when given, must equal its grant's); a system plug-in must name
  tenant, project and execution id and may use any event type.
* ``result_put``: an Arrow IPC stream, the step's result (at most one per call).
* ``object_put``: ``<name> NUL <bytes>``; the name is ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``.
* ``log``: UTF-8 text, at most 4 KiB.

>>> from worker.wasm import Grants
>>> call = Call(Grants(plugin="p", functions=frozenset({"event_publish"}), tenant="acme", project="web",
...                    execution_id="7"))
>>> parse_intent("event_publish", b'{"type": "user.score", "payload": {"n": 1}}', call)
0
>>> call.intents[0].type, call.intents[0].execution_id
('user.score', '7')
>>> parse_intent("event_publish", b'{"type": "step.exit"}', call), call.rejections[-1][1]
(-3, "a user plug-in may publish only user.* events, not 'step.exit'")
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import msgspec
import pyarrow as pa
import pyarrow.ipc

from locator.envelope import (
    DEFAULT_PAYLOAD_CAP,
    USER_TYPE_RE,
    EnvelopeError,
    check_type,
)
from locator.errors import LocatorError
from locator.names import check_execution_id, check_name, check_step

if TYPE_CHECKING:
    from worker.wasm import Grants

__all__ = ["Call", "EventIntent", "Intent", "LogIntent", "ObjectIntent", "ResultIntent", "parse_intent"]

MAX_INTENTS: Final = 1000
MAX_INTENT_BYTES: Final = 16 * 1024 * 1024
MAX_LOG: Final = 4096
OBJECT_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OK, E_INVALID, E_DENIED, E_LIMIT = 0, -2, -3, -4


class EventIntent(msgspec.Struct, frozen=True, kw_only=True, tag_field="function", tag="event_publish"):
    """Publish one event (the caller builds the envelope: event id, timestamp, causation)."""

    type: str
    tenant: str
    project: str
    execution_id: str
    step: str | None = None
    payload: dict[str, Any] = {}


class ResultIntent(msgspec.Struct, frozen=True, kw_only=True, tag_field="function", tag="result_put"):
    """The step's result, an Arrow table (the caller stores it by reference)."""

    table: pa.Table


class ObjectIntent(msgspec.Struct, frozen=True, kw_only=True, tag_field="function", tag="object_put"):
    """Store ``data`` under ``name`` in the invocation's object space."""

    name: str
    data: bytes


class LogIntent(msgspec.Struct, frozen=True, kw_only=True, tag_field="function", tag="log"):
    """One log line from the guest."""

    message: str


Intent = EventIntent | ResultIntent | ObjectIntent | LogIntent


class _EventBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: str
    payload: dict[str, Any] = {}
    step: str | None = None
    tenant: str | None = None
    project: str | None = None
    execution_id: str | None = None


_event_decoder: Final = msgspec.json.Decoder(_EventBody)
_encoder: Final = msgspec.json.Encoder()


class Denied(Exception):
    """An intent outside the grant's scope or limits; ``code`` is what the guest gets back."""

    def __init__(self, reason: str, code: int = E_DENIED) -> None:
        super().__init__(reason)
        self.code = code


class Call:
    """The state of one invocation: its grants, the intents accepted so far, the ones refused and why."""

    def __init__(self, grants: Grants) -> None:
        self.grants = grants
        self.intents: list[Intent] = []
        self.rejections: list[tuple[str, str]] = []
        self.size = 0

    def rejected(self, function: str, reason: str) -> None:
        if len(self.rejections) < MAX_INTENTS:
            self.rejections.append((function, reason))


def parse_intent(function: str, data: bytes, call: Call) -> int:
    """Check ``data`` given to host function ``function``; record the intent and return 0, or a negative code."""
    try:
        if len(call.intents) >= MAX_INTENTS or call.size + len(data) > MAX_INTENT_BYTES:
            raise Denied(f"more than {MAX_INTENTS} intents or {MAX_INTENT_BYTES} bytes in one call", E_LIMIT)
        intent = _PARSERS[function](data, call)
    except Denied as e:
        call.rejected(function, str(e))
        return e.code
    call.intents.append(intent)
    call.size += len(data)
    return OK


def _event(data: bytes, call: Call) -> Intent:
    try:
        body = _event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise Denied(f"not an event intent: {e}", E_INVALID) from None
    grants = call.grants
    if grants.ring == "user":
        if USER_TYPE_RE.fullmatch(body.type) is None:
            raise Denied(f"a user plug-in may publish only user.* events, not {body.type!r}")
        for name in ("tenant", "project", "execution_id"):
            mine, theirs = getattr(grants, name), getattr(body, name)
            if theirs is not None and theirs != mine:
                raise Denied(f"a user plug-in may publish only for its own execution ({name} {theirs!r} is not {mine!r})")
        tenant, project, execution_id = grants.tenant, grants.project, grants.execution_id
    else:
        tenant, project, execution_id = body.tenant, body.project, body.execution_id
    step = body.step if body.step is not None else grants.step
    try:
        check_type(body.type)
        check_name("tenant", tenant)
        check_name("project", project)
        check_execution_id(execution_id)
        if step is not None:
            check_step(step)
    except (EnvelopeError, LocatorError) as e:
        raise Denied(str(e), E_INVALID) from None
    if len(_encoder.encode(body.payload)) > DEFAULT_PAYLOAD_CAP:
        raise Denied(f"event payload over the {DEFAULT_PAYLOAD_CAP}-byte cap (use result_put or object_put)", E_LIMIT)
    assert tenant is not None and project is not None and execution_id is not None
    return EventIntent(
        type=body.type, tenant=tenant, project=project, execution_id=execution_id, step=step, payload=body.payload
    )


def _result(data: bytes, call: Call) -> Intent:
    if any(isinstance(i, ResultIntent) for i in call.intents):
        raise Denied("result_put may be called once per call")
    try:
        table = pa.ipc.open_stream(data).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise Denied(f"result_put needs an Arrow IPC stream: {e}", E_INVALID) from None
    return ResultIntent(table=table)


def _object(data: bytes, call: Call) -> Intent:
    raw_name, sep, body = data.partition(b"\0")
    name = raw_name.decode("ascii", errors="replace")
    if not sep or OBJECT_NAME_RE.fullmatch(name) is None:
        raise Denied("object_put needs '<name> NUL <bytes>' with a name of [A-Za-z0-9._-] (1-128)", E_INVALID)
    return ObjectIntent(name=name, data=body)


def _log(data: bytes, call: Call) -> Intent:
    if len(data) > MAX_LOG:
        raise Denied(f"log line over {MAX_LOG} bytes", E_LIMIT)
    try:
        return LogIntent(message=data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Denied(f"log line is not UTF-8: {e}", E_INVALID) from None


_PARSERS: Final = {"event_publish": _event, "result_put": _result, "object_put": _object, "log": _log}
