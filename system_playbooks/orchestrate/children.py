"""Child executions: what a ``playbook`` step publishes beyond its own execution's WAL.

A parent step attempt starts one child (one per loop iteration) whose id is
derived from ``(parent, step, iteration, attempt)`` (:func:`locator.ids.child_execution_id`),
so a re-planned or redelivered step names the same child. Three kinds of
events cross executions, and possibly shards, all with deterministic ids:

* the child's ``execution.requested`` (``<command id>:start``), naming its
  parent: published by the parent's orchestrator *before* the parent records
  its ``callback.waiting``;
* the child's ``execution.cancel_requested`` (``<child>:cancel``, the id the
  edge's cancel uses too) when the parent is cancelled;
* the parent's ``callback.received`` (``<command id>:ended``) carrying the
  child's status and result: published by the child's orchestrator *before*
  the child records its own end.

"Before" means acknowledged before: a crash in between re-plans the same
state and re-publishes the same ids, which the WAL's duplicate window drops.

>>> ChildLimits.from_env({"NOETL_CHILD_MAX_DEPTH": "3"})
ChildLimits(depth=3, fanout=100)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, EnvelopeError, PayloadTooLarge, encode_envelope, new_event
from locator.errors import LocatorError
from locator.names import check_execution_id, check_name, check_step
from system_playbooks.orchestrate.errors import OrchestrateError
from system_playbooks.orchestrate.state import ExecState

DEPTH_ENV: Final = "NOETL_CHILD_MAX_DEPTH"
FANOUT_ENV: Final = "NOETL_CHILD_MAX_FANOUT"
ENDS: Final = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})


class LimitError(OrchestrateError):
    """A child-execution limit is not a positive integer."""


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """How deep children may nest (a root execution is depth 0) and how many one loop step may start."""

    depth: int = 8
    fanout: int = 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChildLimits:
        """``NOETL_CHILD_MAX_DEPTH`` and ``NOETL_CHILD_MAX_FANOUT``; :class:`LimitError` for a bad value."""
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for field, name in (("depth", DEPTH_ENV), ("fanout", FANOUT_ENV)):
            raw = env.get(name, "")
            if raw == "":
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                values[field] = 0
            if values[field] < 1:
                raise LimitError(f"{name} must be a positive integer, got {raw!r}")
        return cls(**values)


def child_location(state: ExecState, project: Any, affinity: Any) -> tuple[str, str]:
    """The child's (project, affinity): the rendered values, the parent's where unset; ValueError if invalid."""
    where = (state.project if project is None else project, state.affinity if affinity is None else affinity)
    for field, value in zip(("project", "affinity"), where, strict=True):
        if not isinstance(value, str):
            raise ValueError(f"tool.{field} must render to a name, got {type(value).__name__}")
        try:
            check_name(field, value, allow_empty=field == "affinity")
        except LocatorError as e:
            raise ValueError(f"tool.{field}: {e}") from None
    return where


def start_event(
    state: ExecState, *, child_id: str, command_id: str, step: str, iteration: int | None, attempt: int,
    project: str, affinity: str, playbook: dict[str, Any], workload: dict[str, Any],
) -> Envelope:
    """The child's ``execution.requested``; :class:`PayloadTooLarge` if the workload makes it too big."""
    parent = {
        "execution_id": state.execution_id, "tenant": state.tenant, "project": state.project,
        "affinity": state.affinity, "step": step, "iteration": iteration, "attempt": attempt,
        "command_id": command_id, "depth": state.depth + 1,
    }
    env = new_event(
        tenant=state.tenant, project=project, affinity=affinity, execution_id=child_id,
        type="execution.requested", event_id=f"{command_id}:start",
        payload={"playbook": playbook, "workload": workload, "parent": parent},
    )
    encode_envelope(env)
    return env


def cancel_events(state: ExecState) -> list[Envelope]:
    """``execution.cancel_requested`` for every child the execution still waits for."""
    waiting = {
        it.child for run in state.steps.values() for it in run.iterations.values()
        if it.child is not None and not it.received
    }
    return [
        new_event(
            tenant=state.tenant, project=ref.project, affinity=ref.affinity, execution_id=child,
            type="execution.cancel_requested", event_id=f"{child}:cancel",
            payload={"by": "parent", "parent": state.execution_id},
        )
        for child, ref in state.children.items() if child in waiting
    ]


def parent_notice(state: ExecState, end: Envelope) -> Envelope | None:
    """The ``callback.received`` that tells the parent of a child (``state``) how it ended (``end``).

    None for an execution without a (well-formed) parent. A result too big to travel inline fails the
    parent's step rather than stalling the shard.
    """
    p = state.parent
    if p is None or end.type not in ENDS:
        return None
    status = end.type.rpartition(".")[2].upper()
    child: dict[str, Any] = {"execution_id": state.execution_id, "project": state.project,
                             "affinity": state.affinity, "status": status}  # fmt: skip
    if status == "FAILED":
        child["error"] = end.payload.get("error")
    payload: dict[str, Any] = {"command_id": p.get("command_id"), "iteration": p.get("iteration"), "child": child}
    if status == "COMPLETED":
        payload["result"] = end.payload.get("result")
    try:
        attempt = p.get("attempt")
        iteration = p.get("iteration")
        if not isinstance(attempt, int) or not (iteration is None or isinstance(iteration, int)):
            return None
        check_execution_id(p.get("execution_id"))
        check_step(p.get("step"))
        notice = new_event(
            tenant=state.tenant, project=str(p.get("project")), affinity=str(p.get("affinity") or ""),
            execution_id=p["execution_id"], type="callback.received", step=p["step"], attempt=attempt,
            event_id=f"{p.get('command_id')}:ended", payload=payload,
            result_ref=end.result_ref if status == "COMPLETED" else None,
        )
        try:
            encode_envelope(notice, payload_cap=DEFAULT_PAYLOAD_CAP)
        except PayloadTooLarge as e:
            child |= {"status": "FAILED", "error": {
                "type": "payload_too_large", "message": f"the child's result is too large to pass inline: {e}"}}
            payload.pop("result", None)
            notice = new_event(
                tenant=notice.tenant, project=notice.project, affinity=notice.affinity,
                execution_id=notice.execution_id, type=notice.type, step=notice.step, attempt=notice.attempt,
                event_id=notice.event_id, payload=payload,
            )
        return notice
    except (EnvelopeError, LocatorError, KeyError):
        return None
