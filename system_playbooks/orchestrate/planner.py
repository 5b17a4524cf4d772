"""Decide what an execution needs next: a pure function of its state and its playbook.

:func:`plan` looks at an :class:`~.state.ExecState` and returns the events,
commands and timers that are due and not yet recorded. It applies the events
it decides to the state as it goes (so one call reaches a fixed point: a
started execution has its start step entered and its first command issued),
and every event and command it makes has a deterministic id, so planning the
same state twice issues nothing twice: the WAL's duplicate window drops a
repeat, and the state (rebuilt from the WAL after a crash) already shows it.

Rules, in short:

* the first step is entered when the execution starts; a completed step
  enters each ``next`` target whose ``when`` holds; a failed step (after its
  retries) enters its ``on_error`` target, or fails the execution;
* a step with ``join`` is entered once every joined step has finished or can
  no longer run, and at least one of them took its arc to it;
* a ``loop`` step issues one command per item and completes with the results
  in item order;
* a ``callback`` step waits (``callback.waiting`` with a one-time token) with
  no worker held, and times out through a scheduler timer;
* a ``playbook`` step starts a child execution (``Plan.remote``) and waits
  for it like a callback; the child's end arrives as ``callback.received``
  and ends the step with the child's status and result (see :mod:`.children`);
* after ``execution.cancel_requested`` nothing new is issued, the children
  still running are asked to cancel; the execution is ``CANCELLED`` once no
  command is in flight;
* the execution completes when no step is running and none can be entered,
  with its result (:func:`execution_result`); a child's end is told to its
  parent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from locator.command import COMMAND_VERSION, Command, callback_token, command_id
from locator.envelope import Envelope, PayloadTooLarge, new_event, now_ts
from locator.ids import child_execution_id
from system_playbooks.orchestrate.children import (
    ENDS,
    ChildLimits,
    cancel_events,
    child_location,
    parent_notice,
    start_event,
)
from system_playbooks.orchestrate.errors import ExpressionError
from system_playbooks.orchestrate.expressions import ROOTS, Expression, compile_expression
from system_playbooks.orchestrate.playbook import CallbackTool, Playbook, PlaybookTool, Step, tool_kind
from worker.tools.registry import registry
from system_playbooks.orchestrate.state import (
    COMPLETED,
    DONE,
    ENTERED,
    ERROR,
    FAILED,
    ISSUED,
    NOT_LOOP,
    PENDING,
    RETRYING,
    WAITING,
    ExecState,
    IterationState,
    StepRun,
    apply,
)
from system_playbooks.orchestrate.templates import Template, compile_template

MAX_LOOP_ITEMS = 10_000


@dataclass
class PlannedTimer:
    """Publish ``event`` once ``due_ms`` (epoch milliseconds) has passed."""

    due_ms: int
    event: Envelope


@dataclass
class Plan:
    events: list[Envelope] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    timers: list[PlannedTimer] = field(default_factory=list)
    # Events of other executions (a child's start or cancel, a parent's news of its child's end), maybe
    # on other shards: published and acknowledged before ``events``.
    remote: list[Envelope] = field(default_factory=list)
    # A step.exit whose result is over the payload cap: planning paused before it (it is not in
    # ``events`` nor applied); store the result, apply the event with its result_ref, plan again.
    oversized: Envelope | None = None

    def __bool__(self) -> bool:
        return bool(self.events or self.commands or self.timers or self.remote or self.oversized)

    def extend(self, more: Plan) -> None:
        """Append what ``more`` decides (its ``oversized`` is the caller's to handle)."""
        self.events += more.events
        self.commands += more.commands
        self.timers += more.timers
        self.remote += more.remote


class _Pause(Exception):
    """Planning stops at an event that must go by reference first."""


@functools.lru_cache(maxsize=4096)
def _expression(text: str, names: frozenset[str]) -> Expression:
    return compile_expression(text, names=names)


@functools.lru_cache(maxsize=4096)
def _template(source: bytes, names: frozenset[str]) -> Template:
    return compile_template(msgspec.json.decode(source), names=names)


def _names(step: Step) -> frozenset[str]:
    return ROOTS | {step.loop.as_} if step.loop is not None else ROOTS


def _render(value: Any, context: dict[str, Any], names: frozenset[str]) -> Any:
    return _template(msgspec.json.encode(value), names).render(context)


def _context(state: ExecState) -> dict[str, Any]:
    """What templates and expressions see: ``workload`` and ``steps.<name>.{status,result,result_ref,error}``."""
    steps = {
        name: {"status": run.status, "result": run.result, "result_ref": run.result_ref, "error": run.error}
        for name, run in state.steps.items()
    }
    return {"workload": state.workload, "steps": steps}


# Runs a command itself instead of sending it to a worker: the events a worker would publish for it
# (already built, not yet applied), or None to send it (see system_playbooks.orchestrate.inline).
Inline = Callable[[Step, Command], "list[Envelope] | None"]

_PREDS: dict[int, tuple[Playbook, dict[str, list[Step]]]] = {}


def _predecessors(playbook: Playbook) -> dict[str, list[Step]]:
    """Per step, the steps with an arc (``next`` or ``on_error``) to it; cached per playbook object."""
    held = _PREDS.get(id(playbook))
    if held is not None and held[0] is playbook:
        return held[1]
    preds: dict[str, list[Step]] = {s.name: [] for s in playbook.steps}
    for s in playbook.steps:
        for target in {a.step for a in s.next} | ({s.on_error} if s.on_error else set()):
            preds[target].append(s)
    if len(_PREDS) >= 1024:
        _PREDS.clear()
    _PREDS[id(playbook)] = (playbook, preds)
    return preds


class _Planner:
    def __init__(
        self, state: ExecState, playbook: Playbook, now_ms: int, new_token: Callable[[], str], payload_cap: int = 0,
        limits: ChildLimits | None = None, inline: Inline | None = None,
    ) -> None:
        self.payload_cap = payload_cap
        self.limits = limits or ChildLimits()
        self.st = state
        self.pb = playbook
        self.now_ms = now_ms
        self.new_token = new_token
        self.inline = inline
        self.out = Plan()
        self.preds = _predecessors(playbook)

    # -- emitting ----------------------------------------------------------

    def emit(self, type: str, event_id: str, *, step: str | None = None, attempt: int | None = None,
             payload: dict[str, Any] | None = None, result_ref: str | None = None) -> Envelope:
        """Decide an event: applied to the state at once, published by the plug-in.

        An execution's end is told to its parent, if it has one (published first).
        """
        env = self._event(type, event_id, step=step, attempt=attempt, payload=payload or {}, result_ref=result_ref)
        if type == "step.exit" and self.payload_cap and len(msgspec.json.encode(env.payload)) > self.payload_cap:
            self.out.oversized = env
            raise _Pause
        apply(self.st, 0, env, own=True)
        self.out.events.append(env)
        if type in ENDS and (notice := parent_notice(self.st, env)) is not None:
            self.out.remote.append(notice)
        return env

    def _event(
        self, type: str, event_id: str, *, step: str | None, attempt: int | None, payload: dict[str, Any],
        result_ref: str | None = None,
    ) -> Envelope:
        """An event of this execution, not applied (a timer's, to be published later)."""
        st = self.st
        return new_event(
            tenant=st.tenant, project=st.project, affinity=st.affinity, execution_id=st.execution_id,
            type=type, step=step, attempt=attempt, payload=payload, event_id=event_id, ts=now_ts(),
            result_ref=result_ref,
        )

    # -- context -----------------------------------------------------------

    def context(self) -> dict[str, Any]:
        return _context(self.st)

    def taken(self, source: Step, target: str) -> bool:
        """Did ``source`` (finished) take an arc to ``target``?"""
        run = self.st.steps.get(source.name)
        if run is None:
            return False
        if run.status == FAILED:
            return source.on_error == target
        if run.status != COMPLETED:
            return False
        for j, arc in enumerate(source.next):
            if arc.step != target:
                continue
            if arc.when is None:
                return True
            try:
                if _expression(arc.when, ROOTS).evaluate(self.context()):
                    return True
            except ExpressionError as e:
                raise _RouteError(f"{source.name}.next[{j}].when: {e}") from None
        return False

    def settled(self, name: str) -> bool:
        run = self.st.steps.get(name)
        return run is not None and run.status in (COMPLETED, FAILED)

    def dead(self) -> set[str]:
        """Steps not entered that no predecessor can enter any more."""
        dead: set[str] = set()
        changed = True
        while changed:
            changed = False
            for s in self.pb.steps:
                run = self.st.steps.get(s.name)
                if s.name in dead or s.name == self.pb.start or (run is not None and run.status != PENDING):
                    continue
                if all(p.name in dead or (self.settled(p.name) and not self.taken(p, s.name)) for p in self.preds[s.name]):
                    dead.add(s.name)
                    changed = True
        return dead

    # -- steps -------------------------------------------------------------

    def enter(self, step: Step, source: str | None) -> None:
        payload: dict[str, Any] = {"from": source}
        if step.loop is not None:
            try:
                items = _expression(step.loop.over, ROOTS).evaluate(self.context())
            except ExpressionError as e:
                self.emit("step.enter", f"{self.st.execution_id}:{step.name}:enter", step=step.name, payload=payload)
                self.fail_step(step, {"type": "loop", "message": f"loop.over: {e}"})
                return
            if isinstance(step.tool, PlaybookTool) and isinstance(items, list) and len(items) > self.limits.fanout:
                self.emit("step.enter", f"{self.st.execution_id}:{step.name}:enter", step=step.name, payload=payload)
                self.fail_step(step, {"type": "limit", "message": f"loop.over gives {len(items)} items: a playbook "
                                      f"step starts at most {self.limits.fanout} children (NOETL_CHILD_MAX_FANOUT)"})
                return
            if not isinstance(items, list) or len(items) > MAX_LOOP_ITEMS:
                self.emit("step.enter", f"{self.st.execution_id}:{step.name}:enter", step=step.name, payload=payload)
                what = type(items).__name__ if not isinstance(items, list) else f"{len(items)} items"
                self.fail_step(step, {"type": "loop", "message": f"loop.over must give a list of at most "
                                      f"{MAX_LOOP_ITEMS} items, got {what}"})
                return
            payload |= {"iterations": len(items), "items": items}
        self.emit("step.enter", f"{self.st.execution_id}:{step.name}:enter", step=step.name, payload=payload)

    def fail_step(self, step: Step, error: Any) -> None:
        self.emit("step.failed", f"{self.st.execution_id}:{step.name}:failed", step=step.name, payload={"error": error})

    def callback_timer(self, step: Step, iteration: int | None, attempt: int, since_ms: int) -> None:
        cid = command_id(self.st.execution_id, step.name, iteration, attempt)
        timeout = step.timeout or (step.tool.timeout if isinstance(step.tool, CallbackTool) else 0.0)
        fire = self._event("command.completed", f"{cid}:timeout", step=step.name, attempt=attempt,
                           payload={"timer": "callback_timeout", "iteration": iteration, "command_id": cid})
        self.out.timers.append(PlannedTimer(since_ms + int(timeout * 1000), fire))

    def retry_timer(self, step: Step, iteration: int | None, attempt: int, since_ms: int) -> None:
        backoff = step.retry.backoff if step.retry is not None else 0.0
        fire = self._event("command.completed", f"{self.st.execution_id}:{step.name}:"
                           f"{'-' if iteration is None else iteration}:{attempt}:backoff", step=step.name,
                           attempt=attempt, payload={"timer": "retry", "iteration": iteration})
        self.out.timers.append(PlannedTimer(since_ms + int(backoff * 1000), fire))

    def command(self, step: Step, run: StepRun, key: int, attempt: int) -> Command:
        """The command for one attempt, its tool's templates rendered; ExpressionError if one fails."""
        st = self.st
        iteration = None if key == NOT_LOOP else key
        context = self.context()
        if step.loop is not None:
            items = run.items or []
            context |= {step.loop.as_: items[key] if 0 <= key < len(items) else None, "index": key}
        names = _names(step)
        # The kind renders its templated fields (and whatever else its worker needs from the steps before).
        kind = registry().kind(tool_kind(step.tool))
        tool = kind.render(msgspec.to_builtins(step.tool), lambda value: _render(value, context, names), context["steps"])
        return Command(
            v=COMMAND_VERSION, command_id=command_id(st.execution_id, step.name, iteration, attempt),
            execution_id=st.execution_id, tenant=st.tenant, project=st.project, affinity=st.affinity,
            step=step.name, iteration=iteration, attempt=attempt, tool=tool, timeout=step.timeout, issued_ts=now_ts(),
            pool=step.worker_pool,
        )

    def start_child(self, step: Step, tool: PlaybookTool, run: StepRun, key: int, attempt: int) -> None:
        """Start the child of one attempt (iteration) and wait for it: its request first, on its own shard."""
        st = self.st
        iteration = None if key == NOT_LOOP else key
        cid = command_id(st.execution_id, step.name, iteration, attempt)
        if st.depth + 1 > self.limits.depth:
            self.fail_step(step, {"type": "limit", "iteration": iteration, "message": f"a child of this execution "
                                  f"would be at depth {st.depth + 1}, over the limit of {self.limits.depth} "
                                  "(NOETL_CHILD_MAX_DEPTH)"})
            return
        context = self.context()
        if step.loop is not None:
            items = run.items or []
            context |= {step.loop.as_: items[key] if 0 <= key < len(items) else None, "index": key}
        names = _names(step)
        try:
            workload = _render(tool.workload, context, names)
            project, affinity = child_location(st, *(
                None if value is None else _render(value, context, names) for value in (tool.project, tool.affinity)
            ))
        except (ExpressionError, ValueError) as e:
            self.fail_step(step, {"type": "template", "message": f"tool: {e}", "iteration": iteration})
            return
        salt = 0
        while True:  # a digest collision with a sibling: derive the next id, the same way every time
            child = child_execution_id(st.execution_id, step.name, iteration, attempt, salt=salt)
            known = st.children.get(child)
            if known is None or known.command_id == cid:
                break
            salt += 1
        playbook = {"path": tool.path, "version": tool.version}
        try:
            request = start_event(st, child_id=child, command_id=cid, step=step.name, iteration=iteration,
                                  attempt=attempt, project=project, affinity=affinity, playbook=playbook,
                                  workload=workload)
        except PayloadTooLarge as e:
            self.fail_step(step, {"type": "payload_too_large", "iteration": iteration,
                                  "message": f"the child's workload is too large: {e}"})
            return
        self.out.remote.append(request)
        self.emit("callback.waiting", f"{cid}:waiting", step=step.name, attempt=attempt, payload={
            "command_id": cid, "iteration": iteration,
            "child": {"execution_id": child, "project": project, "affinity": affinity, "playbook": playbook},
        })

    def issue(self, step: Step, run: StepRun, key: int, attempt: int) -> None:
        st = self.st
        iteration = None if key == NOT_LOOP else key
        cid = command_id(st.execution_id, step.name, iteration, attempt)
        if isinstance(step.tool, PlaybookTool):
            self.start_child(step, step.tool, run, key, attempt)
            return
        if isinstance(step.tool, CallbackTool):
            token = callback_token(st.tenant, st.project, st.affinity, cid, self.new_token())
            self.emit("callback.waiting", f"{cid}:waiting", step=step.name, attempt=attempt, payload={
                # "callback_id", not "token": served bodies mask keys named like credentials, and the
                # caller needs it (reading the execution's events takes a read token already).
                "command_id": cid, "iteration": iteration, "callback_id": token,
                "callback_path": f"/api/v1/callbacks/{token}", "timeout_s": step.timeout or step.tool.timeout,
            })
            self.callback_timer(step, iteration, attempt, self.now_ms)
            return
        try:
            command = self.command(step, run, key, attempt)
        except ExpressionError as e:
            self.fail_step(step, {"type": "template", "message": f"tool: {e}", "iteration": iteration})
            return
        self.emit("command.issued", f"{cid}:issued", step=step.name, attempt=attempt,
                  payload={"command_id": cid, "iteration": iteration, "kind": command.tool["kind"], "pool": command.pool})
        outcome = None if self.inline is None else self.inline(step, command)
        if outcome is None:
            self.out.commands.append(command)
            return
        # Run here: a worker's report, made now (an input, not a decision), applied so planning moves on.
        for env in outcome:
            apply(self.st, 0, env, own=True)
            self.out.events.append(env)

    def advance(self, step: Step, run: StepRun, key: int) -> None:
        """Move one iteration on: issue, retry, resolve a callback, or fail."""
        it: IterationState = run.iteration(key)
        iteration = None if key == NOT_LOOP else key
        cid = command_id(self.st.execution_id, step.name, iteration, it.issued)
        if it.status == PENDING:
            if not self.st.cancel_requested:
                self.issue(step, run, key, 1)
        elif it.status == WAITING:
            if it.received and it.child is not None and it.child_status != COMPLETED:
                status = it.child_status or "FAILED"
                self.emit("call.error", f"{cid}:error:child", step=step.name, attempt=it.issued, payload={
                    "error": {"type": f"child_{status.lower()}", "child": it.child, "error": it.error,
                              "message": f"child execution {it.child} ended {status}"},
                    "iteration": iteration, "command_id": cid,
                })
            elif it.received:
                result_type = "step.exit" if key == NOT_LOOP else "command.completed"
                self.emit(result_type, f"{self.st.execution_id}:{step.name}:{'-' if iteration is None else iteration}"
                          ":result", step=step.name, attempt=it.issued,
                          payload={"result": it.result, "iteration": iteration, "command_id": cid},
                          result_ref=it.result_ref)
            elif it.timed_out >= it.issued:
                timeout = step.timeout or (step.tool.timeout if isinstance(step.tool, CallbackTool) else 0.0)
                self.emit("call.error", f"{cid}:error:timeout", step=step.name, attempt=it.issued, payload={
                    "error": {"type": "timeout", "message": f"no callback within {timeout:g}s"},
                    "iteration": iteration, "command_id": cid,
                })
        elif it.status == ERROR:
            limit = step.retry.max_attempts if step.retry is not None else 1
            if it.attempt < limit and not self.st.cancel_requested:
                nxt = it.attempt + 1
                self.emit("step.retry", f"{self.st.execution_id}:{step.name}:{'-' if iteration is None else iteration}"
                          f":{nxt}:retry", step=step.name, attempt=nxt,
                          payload={"iteration": iteration, "error": it.error})
                if step.retry is not None and step.retry.backoff > 0:
                    self.retry_timer(step, iteration, nxt, self.now_ms)
            elif not self.st.cancel_requested or it.attempt >= limit:
                error = it.error if iteration is None else {"iteration": iteration, "error": it.error}
                self.fail_step(step, error)
        elif it.status == RETRYING and not self.st.cancel_requested:
            backoff = step.retry.backoff if step.retry is not None else 0.0
            if it.retry_ready >= it.retry_due or backoff <= 0:
                self.issue(step, run, key, it.retry_due)

    def run_step(self, step: Step, run: StepRun) -> None:
        if run.count is None:
            self.advance(step, run, NOT_LOOP)
            return
        for key in range(run.count):
            if run.status != ENTERED:
                return  # an iteration failed the step
            self.advance(step, run, key)
        if run.status == ENTERED and all(run.iteration(k).status == DONE for k in range(run.count)):
            results = [
                it.result if it.result_ref is None else {"result_ref": it.result_ref}
                for it in (run.iteration(k) for k in range(run.count))
            ]
            self.emit("step.exit", f"{self.st.execution_id}:{step.name}:-:result", step=step.name,
                      attempt=max([1, *(run.iteration(k).attempt for k in range(run.count))]),
                      payload={"result": results, "iteration": None})

    # -- the round ---------------------------------------------------------

    def in_flight(self) -> bool:
        return any(
            it.status == ISSUED for run in self.st.steps.values() if run.status == ENTERED
            for it in run.iterations.values()
        )

    def route(self) -> bool:
        """Enter every step that became ready; True if any was."""
        entered = False
        dead: set[str] | None = None
        for step in self.pb.steps:
            run = self.st.steps.get(step.name)
            if run is not None and run.status != PENDING:
                continue
            if step.join:
                dead = self.dead() if dead is None else dead
                if not all(self.settled(j) or j in dead for j in step.join):
                    continue
                sources = [s for s in self.preds[step.name] if s.name in step.join and self.taken(s, step.name)]
            else:
                sources = [s for s in self.preds[step.name] if self.settled(s.name) and self.taken(s, step.name)]
            if sources:
                self.enter(step, sources[0].name)
                entered = True
                dead = None
        return entered

    def plan(self) -> Plan:
        try:
            return self._plan()
        except _Pause:
            return self.out

    def _plan(self) -> Plan:
        st, pb = self.st, self.pb
        if st.pinned is None:
            self.emit("execution.started", f"{st.execution_id}:started", payload={
                "playbook": {"path": pb.path, "version": pb.version}, "workload": pb.workload | st.workload,
            })
        start = st.steps.get(pb.start)
        if (start is None or start.status == PENDING) and not st.cancel_requested:
            # Not only right after execution.started: a crash may have stored it but not this step.enter.
            self.enter(pb.steps[0], None)
        for _ in range(len(pb.steps) * 4 + 4):
            before = len(self.out.events)
            for step in pb.steps:
                run = st.steps.get(step.name)
                if run is not None and run.status == ENTERED:
                    self.run_step(step, run)
            for step in pb.steps:
                run = st.steps.get(step.name)
                if run is not None and run.status == FAILED and step.on_error is None:
                    self.emit("execution.failed", f"{st.execution_id}:failed",
                              payload={"error": {"step": step.name, "error": run.error}})
                    return self.out
            if st.cancel_requested:
                self.out.remote += cancel_events(st)
                if not self.in_flight():
                    self.emit("execution.cancelled", f"{st.execution_id}:cancelled", payload={})
                return self.out
            try:
                self.route()
            except _RouteError as e:
                self.emit("execution.failed", f"{st.execution_id}:failed",
                          payload={"error": {"type": "expression", "message": str(e)}})
                return self.out
            if len(self.out.events) == before:
                break
        if not any(run.status == ENTERED for run in st.steps.values()) and st.steps:
            try:
                result, ref = execution_result(st, pb)
            except ExpressionError as e:
                self.emit("execution.failed", f"{st.execution_id}:failed",
                          payload={"error": {"type": "template", "message": f"result: {e}"}})
                return self.out
            self.emit("execution.completed", f"{st.execution_id}:completed", payload={"result": result},
                      result_ref=ref)
        return self.out


    def resume(self, window_ms: int, inline: Callable[[Step], bool] | None = None) -> Plan:
        """Re-send what a crash may have lost between recording a decision and acting on it.

        A command recorded as issued, unclaimed, and younger than the WAL's
        duplicate window is published again (a repeat is dropped by its
        ``Nats-Msg-Id``); the timers of waiting callbacks and pending retries
        are set again (a timer that fires twice is ignored the second time).

        A step the orchestrator runs itself (``inline``, see :mod:`.inline`) has no copy of its command
        in ``CMD_<shard>``: its command is returned whatever its age while it is unclaimed or claimed
        ``inline`` (the caller runs it inline again, with the same event ids).
        """
        for step in self.pb.steps:
            run = self.st.steps.get(step.name)
            if run is None or run.status != ENTERED:
                continue
            ours = inline is not None and inline(step)
            for key, it in sorted(run.iterations.items()):
                iteration = None if key == NOT_LOOP else key
                if it.status == ISSUED and (
                    it.inline or (not it.claimed and (ours or self.now_ms - it.since_ms < window_ms))
                ):
                    try:
                        self.out.commands.append(self.command(step, run, key, it.issued))
                    except ExpressionError:
                        pass  # it rendered when issued; the planner fails it if it is retried
                elif it.status == WAITING and not it.received and it.child is None:
                    self.callback_timer(step, iteration, it.issued, it.since_ms)
                elif it.status == RETRYING and step.retry is not None and step.retry.backoff > 0:
                    self.retry_timer(step, iteration, it.retry_due, it.since_ms)
        return self.out


class _RouteError(Exception):
    pass


def plan(
    state: ExecState, playbook: Playbook, *, now_ms: int, new_token: Callable[[], str], payload_cap: int = 0,
    limits: ChildLimits | None = None, inline: Inline | None = None,
) -> Plan:
    """What ``state`` needs next under ``playbook``; the returned events are already applied to ``state``.

    With ``payload_cap``, planning pauses at a step result too big for an event (``Plan.oversized``).
    ``limits`` bound child executions (default :class:`ChildLimits`'s defaults). ``inline`` runs the
    commands it takes at once: its events follow their ``command.issued`` in ``events`` (in place of a
    command) and planning goes on from them, so a chain of such steps is planned in one call.
    """
    if not state.requested or state.terminal:
        return Plan()
    return _Planner(state, playbook, now_ms, new_token, payload_cap, limits, inline).plan()


def _topological(playbook: Playbook) -> tuple[str, ...]:
    """The steps in an order every arc goes forward in (ties: document order)."""
    preds = {s.name: 0 for s in playbook.steps}
    for s in playbook.steps:
        for target in {a.step for a in s.next} | ({s.on_error} if s.on_error else set()):
            preds[target] += 1
    order: list[str] = []
    ready = [s.name for s in playbook.steps if preds[s.name] == 0]
    while ready:
        name = ready.pop(0)
        order.append(name)
        step = playbook.step(name)
        for target in dict.fromkeys([a.step for a in step.next] + ([step.on_error] if step.on_error else [])):
            preds[target] -= 1
            if preds[target] == 0:
                ready.append(target)
    return tuple(order)


def execution_result(state: ExecState, playbook: Playbook) -> tuple[Any, str | None]:
    """An execution's result and its reference: the playbook's ``result`` template rendered, or else the
    result of the step that completed last (the last completed step in the graph's order, so that every
    rebuild of the state picks the same one). ExpressionError if the template fails.
    """
    if playbook.result is not msgspec.UNSET:
        return _render(playbook.result, _context(state), ROOTS), None
    for name in reversed(_topological(playbook)):
        run = state.steps.get(name)
        if run is not None and run.status == COMPLETED:
            return (None if run.result_ref is not None else run.result), run.result_ref
    return None, None


def resume(
    state: ExecState, playbook: Playbook, *, now_ms: int, window_ms: int, inline: Callable[[Step], bool] | None = None,
) -> Plan:
    """Commands and timers to send again after the state was rebuilt from the WAL (see :meth:`_Planner.resume`)."""
    if not state.requested or state.terminal or state.pinned is None:
        return Plan()
    return _Planner(state, playbook, now_ms, lambda: "").resume(window_ms, inline)


def fail_unstartable(state: ExecState, reason: str) -> Plan:
    """The execution's playbook cannot be found or loaded: it fails at once, with the reason."""
    if not state.requested or state.terminal:
        return Plan()
    env = new_event(
        tenant=state.tenant, project=state.project, affinity=state.affinity, execution_id=state.execution_id,
        type="execution.failed", event_id=f"{state.execution_id}:failed", ts=now_ts(),
        payload={"error": {"type": "playbook", "message": reason}},
    )
    apply(state, 0, env, own=True)
    notice = parent_notice(state, env)
    return Plan(events=[env], remote=[notice] if notice is not None else [])

