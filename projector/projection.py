"""The projection of one execution, and its canonical JSON encoding.

Canonical = keys sorted at every level, compact separators, UTF-8: two
projections are equal exactly when their canonical bytes are equal.
"""

from __future__ import annotations

from typing import Any

import msgspec

USER_EVENTS_KEPT = 100
# Payload bytes (compact JSON) the kept user events may hold together; see projector.fold._bound_user_payloads.
USER_PAYLOAD_BUDGET = 256 * 1024


class StepState(msgspec.Struct, kw_only=True):
    status: str = "PENDING"
    attempts: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    result: Any = None
    result_ref: str | None = None
    error: Any = None
    # The worker pool of its latest command, and how many of its commands wait there unclaimed (present
    # while any does: a pool nobody serves shows here). Absent for steps issued before pools.
    pool: str | msgspec.UnsetType = msgspec.UNSET
    queued: int | msgspec.UnsetType = msgspec.UNSET


class UserEvent(msgspec.Struct, kw_only=True):
    """One kept ``user.*`` event. ``payload_bytes`` is the size of its payload as compact JSON; an event
    whose payload fell outside :data:`USER_PAYLOAD_BUDGET` keeps its seq, type, ts and size, with
    ``payload`` ``{}`` and ``payload_omitted`` true (the WAL still holds it whole)."""

    seq: int
    type: str
    ts: str
    payload: dict[str, Any]
    payload_bytes: int = 0
    payload_omitted: bool = False


class Projection(msgspec.Struct, kw_only=True):
    """State of one execution folded from its WAL events (see :func:`projector.fold.fold`)."""

    execution_id: str
    tenant: str
    project: str
    affinity: str = ""
    status: str = "PENDING"
    playbook: dict[str, Any] | None = None
    workload: dict[str, Any] = msgspec.field(default_factory=dict)
    steps: dict[str, StepState] = msgspec.field(default_factory=dict)
    error: Any = None
    cancel_requested: bool = False
    # Present only when they have a value, so that the canonical bytes of executions that use none of
    # them stay what they were: the execution's result (from execution.completed), the parent of a
    # child execution, and the children a playbook step started.
    result: Any | msgspec.UnsetType = msgspec.UNSET
    result_ref: str | None | msgspec.UnsetType = msgspec.UNSET
    parent: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    children: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET
    user_events: list[UserEvent] = msgspec.field(default_factory=list)
    user_event_count: int = 0
    last_seq: int = 0
    event_count: int = 0
    created_at: str = ""
    updated_at: str = ""


TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
STEP_TERMINAL = frozenset({"COMPLETED", "FAILED"})

_canonical = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Projection)


def canonical(projection: Projection) -> bytes:
    """Canonical JSON bytes (sorted keys, compact).

    >>> canonical(Projection(execution_id="1", tenant="a", project="b"))[:40]
    b'{"affinity":"","cancel_requested":false,'
    """
    return _canonical.encode(projection)


def decode_projection(data: bytes | str) -> Projection:
    return _decoder.decode(data)


def copy_projection(projection: Projection) -> Projection:
    """A deep copy (the fold never mutates its input)."""
    return _decoder.decode(_canonical.encode(projection))
