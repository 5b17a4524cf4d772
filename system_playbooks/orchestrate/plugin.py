"""``system/orchestrate``: drive executions step by step off the shard's WAL.

For each execution in a batch: bring its :class:`~.state.ExecState` up to
date (from memory, or rebuilt from the WAL after a restart), let the
:mod:`.planner` decide, then make the decision durable: the events
(``step.enter``, ``command.issued``…) to the WAL, the commands to
``CMD_<shard>`` and the timers to ``cmd.<shard>.timer``, sent in that order on
one connection and only then waited for (a worker can start a step while its
``command.issued`` ack is on its way back). Only once every ack is back is the
batch acknowledged. A crash anywhere in between re-plans the same state:
every event and command has a deterministic id, so nothing is issued twice.

A step with nothing to run (a ``noop``) does not cross a worker: its
``command.issued`` is followed by the claim and result a worker would have
published, made here (:mod:`.inline`), and planning goes on from them in the
same planning call, so a chain of such steps completes in one pass.

Events of other executions (a child's start or cancel, a parent's news of its
child's end, see :mod:`.children`) go first, to whichever shard owns them,
and are acknowledged before anything of the execution itself is sent: the
execution's own record never shows a decision whose cross-shard half is lost.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from kernel.errors import ConfigError
from kernel.host import PluginError, Reject, ShardContext
from locator.command import TIMER_POOL, Command, Timer, command_encoder
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, PayloadTooLarge, encode_envelope, new_event
from locator.subjects import cmd_subject, wal_subject
from projector.fanout import fan_out
from projector.fold import WalEvent
from projector.results import ResultKey
from system_playbooks.orchestrate.catalog import Catalog, CatalogError, policy_from_env
from system_playbooks.orchestrate.children import ChildLimits, LimitError, parent_notice
from system_playbooks.orchestrate.inline import Inliner, inline_from_env
from system_playbooks.orchestrate.planner import Plan, fail_unstartable, plan, resume
from system_playbooks.orchestrate.playbook import Playbook, Step
from system_playbooks.orchestrate.state import NOT_LOOP, ExecState, apply, new_state

MAX_CACHED = 10_000
PASSIVE = frozenset({"command.claimed"})  # event types that never change what the planner decides
CONCURRENCY = 16


def _ref(value: object) -> tuple[str, int | None] | None:
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        return None
    version = value.get("version")
    return value["path"], version if isinstance(version, int) and not isinstance(version, bool) else None


class OrchestratePlugin:
    """Keeps every execution with a playbook moving; stateless across restarts (state is the WAL)."""

    def __init__(self) -> None:
        # Per shard: the context it was built under, and the states of its executions (LRU).
        self._shards: dict[int, tuple[ShardContext, OrderedDict[str, ExecState]]] = {}
        # Per shard: the context, and the WAL sequence past which a lone execution.requested is new to the shard's
        # orchestrators (published after this lease began and not in a batch that failed since).
        self._unseen_after: dict[int, tuple[ShardContext, int]] = {}
        self._playbooks: dict[tuple[str, str, str, int], Playbook] = {}
        try:
            self._limits = ChildLimits.from_env()
        except LimitError as e:
            raise PluginError(f"system/orchestrate: {e}") from None
        try:
            self._inliner = Inliner(enabled=inline_from_env(os.environ), policy=policy_from_env(os.environ),
                                    payload_cap=DEFAULT_PAYLOAD_CAP)
        except ConfigError as e:
            raise PluginError(f"system/orchestrate: {e}") from None

    def _states(self, ctx: ShardContext) -> OrderedDict[str, ExecState]:
        held = self._shards.get(ctx.shard)
        if held is None or held[0] is not ctx:
            # A new lease on the shard: another kernel may have moved its executions on meanwhile.
            held = self._shards[ctx.shard] = (ctx, OrderedDict())
        return held[1]

    async def _state(self, ctx: ShardContext, events: list[WalEvent]) -> tuple[ExecState, bool]:
        """The execution's state before ``events``, and whether it was just rebuilt from the WAL."""
        states = self._states(ctx)
        env = events[0].env
        state = states.get(env.execution_id)
        if state is not None:
            states.move_to_end(env.execution_id)
            return state, False
        state = new_state(env)
        rebuilt = await self._needs_history(ctx, events)
        if rebuilt:
            async for seq, event in ctx.history(env.tenant, env.project, env.execution_id):
                if (event.tenant, event.project) == (state.tenant, state.project):
                    apply(state, seq, event)
        states[env.execution_id] = state
        while len(states) > MAX_CACHED:
            states.popitem(last=False)
        return state, rebuilt

    async def _needs_history(self, ctx: ShardContext, events: list[WalEvent]) -> bool:
        """Must an unknown execution be rebuilt from its history, or do ``events`` tell all that matters?

        Two cheap lookups spare most executions a history read: one that
        starts in this batch with ``execution.requested`` alone and has
        nothing after it in the WAL yet, and one that was never requested (a
        stream of user events, nothing to orchestrate). A batch that holds
        the request and more of the execution (a redelivery after the
        orchestrator published its decisions, inline steps' results among
        them) reads the history: what lies between is not in the batch.

        The first needs no lookup at all when the request was stored after
        this lease began (no earlier holder of the shard can have decided
        anything for it) and after any batch of this lease that failed
        (whose decisions may be stored while the execution's state was
        dropped): nothing of it can follow in the WAL but what this
        orchestrator publishes.
        """
        env = events[0].env
        who = (env.tenant, env.project, env.execution_id)
        if env.type == "execution.requested":
            if len(events) > 1:
                return True
            held = self._unseen_after.get(ctx.shard)
            if held is not None and held[0] is ctx and events[0].seq > held[1]:
                return False
            return await ctx.next_event_seq(*who, after_seq=events[-1].seq) is not None
        return await ctx.next_event_seq(*who, after_seq=0, type="execution.requested") is not None

    async def _playbook(self, ctx: ShardContext, state: ExecState) -> Playbook | str:
        """The execution's playbook, or why it cannot be had."""
        ref = _ref(state.pinned) or _ref(state.playbook_ref)
        if ref is None:
            return f"invalid playbook reference {state.playbook_ref!r}: expected {{\"path\": ..., \"version\": N}}"
        path, version = ref
        if version is not None and (key := (state.tenant, state.project, path, version)) in self._playbooks:
            return self._playbooks[key]
        try:
            playbook = await Catalog(await ctx.catalog_bucket()).get(state.tenant, state.project, path, version)
        except CatalogError as e:
            return str(e)
        self._playbooks[(state.tenant, state.project, path, playbook.version)] = playbook
        return playbook

    async def _by_reference(self, ctx: ShardContext, state: ExecState, env: Envelope) -> Envelope:
        """``env`` (a step.exit too big for an event) with its result stored and referenced, applied to the state."""
        step = env.step or ""
        key = ResultKey(state.tenant, state.project, state.execution_id, step, None, env.attempt or 1)
        stored = await asyncio.to_thread(ctx.results().put, key, env.payload.get("result"))
        env = msgspec.structs.replace(
            env, payload=env.payload | {"result": None, "result_bytes": stored.size}, result_ref=stored.ref
        )
        apply(state, 0, env, own=True)
        return env

    def _inline(self, step: Step, command: Command) -> list[Envelope] | None:
        """The planner's hook: a just-issued command run here (see :mod:`.inline`), or None for a worker."""
        return self._inliner.outcome(step, command, claimed=False)

    def _run_inline(self, state: ExecState, playbook: Playbook, decided: Plan) -> None:
        """Run the resumed commands of ``decided`` that need no worker (see :mod:`.inline`).

        Their outcome events take their place, applied to the state at once, so the planning that
        follows moves on from them within this batch.
        """
        commands = []
        for command in decided.commands:
            run = state.steps.get(command.step)
            key = NOT_LOOP if command.iteration is None else command.iteration
            it = None if run is None else run.iterations.get(key)
            outcome = None if it is None else self._inliner.outcome(
                playbook.step(command.step), command, claimed=it.claimed and it.issued == command.attempt)
            if outcome is None:
                commands.append(command)
                continue
            for env in outcome:
                apply(state, 0, env, own=True)
            decided.events += outcome
        decided.commands = commands

    async def _plan(self, ctx: ShardContext, state: ExecState, playbook: Playbook, now_ms: int) -> Plan:
        decided = Plan()
        while True:
            # A chain of inline steps is planned in this one call: each outcome is applied, then planned on.
            more = plan(state, playbook, now_ms=now_ms, new_token=_token, payload_cap=DEFAULT_PAYLOAD_CAP,
                        limits=self._limits, inline=self._inline)
            decided.extend(more)
            if more.oversized is None:
                return decided
            # A loop's aggregate or a callback's payload: stored first, so what is planned next
            # (templates reading steps.<name>.result_ref) sees the state a rebuild would see.
            decided.events.append(await self._by_reference(ctx, state, more.oversized))

    def _fit(self, ctx: ShardContext, state: ExecState, decided: Plan) -> Plan:
        """Anything else too big for an event (a huge loop list, workload or error) fails the execution.

        It must never stall the shard: the refused event would be retried and dead-lettered, and every
        other execution on the shard would wait meanwhile.
        """
        for i, env in enumerate(decided.events):
            try:
                encode_envelope(env)
            except PayloadTooLarge as e:
                # The state holds the refused decision: rebuild it from the WAL next time.
                self._states(ctx).pop(state.execution_id, None)
                failed = new_event(
                    tenant=state.tenant, project=state.project, affinity=state.affinity,
                    execution_id=state.execution_id, type="execution.failed",
                    event_id=f"{state.execution_id}:failed", payload={"error": {
                        "type": "payload_too_large", "step": env.step,
                        "message": f"the orchestrator's {env.type} event would be too large: {e}",
                    }},
                )
                # The parent hears of this end, not of the one refused (same event id: the first would win).
                notice = parent_notice(state, failed)
                told = [notice] if notice is not None else []
                remote = [r for r in decided.remote if all(r.event_id != n.event_id for n in told)]
                return Plan(events=[*decided.events[:i], failed], remote=remote + told)
        return decided

    async def _publish(self, ctx: ShardContext, state: ExecState, decided: Plan) -> None:
        # Events, then commands and timers, all queued before any ack is waited for: one connection,
        # so the server reads the events first; the batch is acked only once every ack came back.
        producer = ctx.producer()
        for sent_remote in [await producer.send(env) for env in decided.remote]:
            await producer.confirm(sent_remote)
        events = [await producer.send(env) for env in decided.events]
        commands = [
            await ctx.send_command(
                cmd_subject(ctx.shard, command.pool), command_encoder.encode(command),
                msg_id=command.command_id,
            )
            for command in decided.commands
        ]
        for timer in decided.timers:
            env = timer.event
            data = encode_envelope(env)
            subject = wal_subject(ctx.shard, env.tenant, env.project, env.execution_id, env.type)
            body = msgspec.json.encode(Timer(due_ms=timer.due_ms, subject=subject, msg_id=env.event_id, data=data))
            commands.append(await ctx.send_command(cmd_subject(ctx.shard, TIMER_POOL), body, msg_id=f"timer:{env.event_id}"))
        for ack in await producer.confirm_many(events):
            if ack.seq > state.last_seq:
                state.ahead.add(ack.seq)
        for sent_command in commands:
            await ctx.confirm_command(sent_command)

    async def _one(self, ctx: ShardContext, events: list[WalEvent]) -> None:
        state, rebuilt = await self._state(ctx, events)
        fresh = [e for e in events if (e.env.tenant, e.env.project) == (state.tenant, state.project)]
        changed = rebuilt
        for seq, env in fresh:
            # A claim is recorded (resume reads it) but decides nothing: it alone is no reason to plan.
            changed = (apply(state, seq, env) and env.type not in PASSIVE) or changed
        if not changed or not state.requested or state.playbook_ref is None or state.terminal:
            return
        log = ctx.log.bind(execution_id=state.execution_id)
        playbook = await self._playbook(ctx, state)
        try:
            if isinstance(playbook, str):
                log.warning("orchestrate.unstartable", reason=playbook)
                decided = fail_unstartable(state, playbook)
            else:
                now_ms = int(time.time() * 1000)
                decided = Plan()
                if rebuilt:
                    decided = resume(state, playbook, now_ms=now_ms, window_ms=ctx.duplicate_window_ms,
                                     inline=self._inliner.step)
                    self._run_inline(state, playbook, decided)
                decided.extend(await self._plan(ctx, state, playbook, now_ms))
            if decided:
                await self._publish(ctx, state, self._fit(ctx, state, decided))
                log.debug("orchestrate.planned", events=len(decided.events), commands=len(decided.commands))
        except BaseException:
            # The state already holds decisions that may not be stored: rebuild it from the WAL next time.
            self._states(ctx).pop(state.execution_id, None)
            raise

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> list[Reject]:
        held = self._unseen_after.get(ctx.shard)
        if held is None or held[0] is not ctx:
            # A new lease: what is in the WAL now may have been seen by the shard's previous orchestrator.
            self._unseen_after[ctx.shard] = (ctx, await ctx.wal_last_seq())
        by_execution: dict[str, list[WalEvent]] = {}
        for event in events:
            by_execution.setdefault(event.env.execution_id, []).append(event)
        try:
            await fan_out(lambda evs: self._one(ctx, evs), by_execution.values(), limit=CONCURRENCY)
        except BaseException:
            # Redelivered next: an execution of it may have decisions stored and no state held any more.
            floor = self._unseen_after[ctx.shard][1]
            self._unseen_after[ctx.shard] = (ctx, max(floor, events[-1].seq))
            raise
        return []


def _token() -> str:
    return secrets.token_urlsafe(24)
