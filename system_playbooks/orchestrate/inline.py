"""Trivial steps run inline: a ``noop`` need not cross a worker.

A ``noop`` step's result is its rendered ``result``, already in the command
the planner built, so sending it to ``CMD_<shard>`` for a worker to echo back
costs a command, a fetch, two WAL publishes from another process and one more
fold pass per step, for nothing. Instead, ``system/orchestrate`` publishes
the very events a data worker would for the command's first delivery:

* ``command.claimed`` ``<command_id>:claimed:1``, payload ``{command_id,
  iteration, delivery: 1, worker: "inline", pool}``;
* ``step.exit`` (``command.completed`` for a loop iteration)
  ``<execution_id>:<step>:<iteration or ->:result``, payload ``{result,
  iteration, command_id}``;

both with ``causation_id`` = the command id and the attempt of the command,
so they are *inputs* to ``replay --check`` exactly as a worker's are, and the
projection folds them the same way (``worker`` is not in the projection; the
timeline says ``claimed … by inline in pool shared``). ``command.issued``
is still written: the record, the check, the queue counts of the projection
and every consumer of the WAL see the same decision whoever ran the step.

Every id is derived from the command id, so a redelivered batch or an
orchestrator restarted after a crash publishes the same ids (dropped by
``Nats-Msg-Id``). An iteration recorded as issued but not finished is run
inline again after a rebuild (:func:`~.planner.resume`): one whose claim was
``inline`` publishes only its result (no worker holds it, whatever its age);
one not claimed yet, the claim and the result.

Which steps: ``tool: noop`` without a ``pool`` (a step that names a pool asks
for a worker of it), when the operator allows ``noop`` (``NOETL_TOOL_KINDS``)
and the result fits an event (over the payload cap a worker stores it by
reference, so the command goes to a worker). ``NOETL_INLINE_STEPS=0`` turns
it off: every step then crosses a worker, as before (for comparing the two,
and for an operator who wants a noop to probe a pool's workers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from kernel.errors import ConfigError
from locator.command import Command
from locator.envelope import Envelope, new_event
from system_playbooks.orchestrate.playbook import NoopTool, Policy, Step
from system_playbooks.orchestrate.state import INLINE_WORKER

__all__ = ["INLINE_KINDS", "INLINE_WORKER", "Inliner", "inline_from_env"]

# Kinds whose run is a pure function of the rendered command: nothing to call, nothing to read.
INLINE_KINDS: Final = frozenset({"noop"})
_ON, _OFF = frozenset({"1", "on", "true", "yes"}), frozenset({"0", "off", "false", "no"})
_encoder: Final = msgspec.json.Encoder()


def inline_from_env(env: Mapping[str, str]) -> bool:
    """``NOETL_INLINE_STEPS``: on unless set to 0/off/false/no.

    >>> inline_from_env({}), inline_from_env({"NOETL_INLINE_STEPS": "off"})
    (True, False)
    >>> inline_from_env({"NOETL_INLINE_STEPS": "maybe"})
    Traceback (most recent call last):
    ...
    kernel.errors.ConfigError: NOETL_INLINE_STEPS must be one of 1, on, true, yes, 0, off, false, no; got 'maybe'
    """
    raw = env.get("NOETL_INLINE_STEPS", "").strip().lower()
    if not raw or raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ConfigError(f"NOETL_INLINE_STEPS must be one of 1, on, true, yes, 0, off, false, no; got {raw!r}")


class Inliner:
    """Decides which commands run inline and builds the events a worker would have published for them."""

    def __init__(self, *, enabled: bool, policy: Policy, payload_cap: int) -> None:
        self.kinds = frozenset(k for k in INLINE_KINDS if policy.allows_kind(k)) if enabled else frozenset()
        self.payload_cap = payload_cap

    def step(self, step: Step) -> bool:
        """Is ``step`` one that runs inline (its kind, its pool)?"""
        return step.pool is None and isinstance(step.tool, NoopTool) and "noop" in self.kinds

    def outcome(self, step: Step, command: Command, *, claimed: bool) -> list[Envelope] | None:
        """The claim (unless ``claimed`` already) and the result of ``command`` run inline; None: a worker's job.

        >>> from system_playbooks.orchestrate.playbook import Policy
        >>> step = Step(name="a", tool=NoopTool(result={"x": 1}))
        >>> c = Command(v=1, command_id="7:a:-:1", execution_id="7", tenant="acme", project="web", affinity="",
        ...             step="a", iteration=None, attempt=1, tool={"kind": "noop", "result": {"x": 1}})
        >>> [(e.type, e.event_id, e.payload) for e in Inliner(enabled=True, policy=Policy(), payload_cap=65536)
        ...  .outcome(step, c, claimed=False)]  # doctest: +NORMALIZE_WHITESPACE
        [('command.claimed', '7:a:-:1:claimed:1',
          {'command_id': '7:a:-:1', 'iteration': None, 'delivery': 1, 'worker': 'inline', 'pool': 'shared'}),
         ('step.exit', '7:a:-:result', {'result': {'x': 1}, 'iteration': None, 'command_id': '7:a:-:1'})]
        """
        if not self.step(step) or command.tool.get("kind") not in self.kinds:
            return None
        iteration = command.iteration
        try:
            # What a worker reads: the command as JSON (a tuple arrives as a list).
            result: Any = msgspec.json.decode(_encoder.encode(command.tool.get("result")))
            payload: dict[str, Any] = {"result": result, "iteration": iteration, "command_id": command.command_id}
            if len(_encoder.encode(payload)) > self.payload_cap:
                return None  # a worker stores it by reference
        except (TypeError, msgspec.EncodeError):
            return None  # not JSON: the worker reports it (bad_result) as it always has
        events: list[Envelope] = []
        if not claimed:
            events.append(self._event(command, "command.claimed", f"{command.command_id}:claimed:1", payload={
                "command_id": command.command_id, "iteration": iteration, "delivery": 1,
                "worker": INLINE_WORKER, "pool": command.pool,
            }))
        done = "step.exit" if iteration is None else "command.completed"
        event_id = f"{command.execution_id}:{command.step}:{'-' if iteration is None else iteration}:result"
        events.append(self._event(command, done, event_id, payload=payload))
        return events

    @staticmethod
    def _event(command: Command, type: str, event_id: str, *, payload: dict[str, Any]) -> Envelope:
        return new_event(
            tenant=command.tenant, project=command.project, affinity=command.affinity,
            execution_id=command.execution_id, type=type, step=command.step, attempt=command.attempt,
            event_id=event_id, causation_id=command.command_id, payload=payload,
        )  # fmt: skip
