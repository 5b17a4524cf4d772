"""Timing hooks for ``bench/steps.py --profile``: where one step's time goes inside the kernel and the workers.

``python bench/steps.py --serve kernel|worker OUT -- <noetl-edge arguments>``
runs the real ``noetl-edge`` command (``edge.cli.main``) in this process after
wrapping a few methods with timers, and writes what they recorded to ``OUT``
(JSON) when the command returns. The wrappers only read clocks
(``time.time_ns``, the same wall clock nats-server stamps stored messages
with) and append to a list: the code under test runs unchanged.

Kernel, per pump batch (``Pump.run_once``): when the pump asked for messages,
when ``_fetch`` returned them (and their stream sequences and store times),
the plug-in call (``_dispatch``), and inside ``system/orchestrate`` the time
of ``plan`` and of each ``_publish``: from its first send to its last ack.
Inside that, the sends (``Producer.send`` of the events,
``ShardContext.send_command`` of the commands and timers: queued, no ack
waited for), the ack waits (``Producer.confirm``,
``ShardContext.confirm_command``) and any re-publish a missing ack caused
(``Producer._publish_prepared``, ``ShardContext.publish_command``: only on a
retry). The rest of ``run_once`` after the plug-in returned is the batch's ack
(sent, not waited for) and the pump's bookkeeping.

Worker, per command (``Worker._process``): the command's store time in
``CMD_<shard>``, when the worker started on it, the ``Producer.send`` of
``command.claimed`` (queued, not waited for), ``Worker._run``, the
``Producer.publish`` of the outcome (``step.exit`` or ``call.error``, until
its ack), the ``Producer.confirm`` of the claim and, after it, the command's
``ack_sync``.

:func:`analyse` lines these up with the WAL's store timestamps of the
measured executions and returns medians per segment of a step.
"""

from __future__ import annotations

import contextvars
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]
RECORDS: list[Record] = []
_current: contextvars.ContextVar[Record | None] = contextvars.ContextVar("bench_record", default=None)


def ack_tokens(reply: str | None) -> tuple[int, int]:
    """(stream sequence, store ns) from a JetStream ack subject (v1: 9 tokens, v2 with domain: 12)."""
    tokens = (reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7])
    return int(tokens[7]), int(tokens[9])


def _timed(key: str, fn: Any) -> Any:
    """Wrap the coroutine function ``fn``: add its wall time (ns) under ``key`` to the current record."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = _current.get()
        t0 = time.time_ns()
        try:
            return await fn(*args, **kwargs)
        finally:
            if rec is not None:
                rec.setdefault(key, []).append((t0, time.time_ns()))

    return wrapper


def install_kernel_hooks() -> None:
    from kernel.host import ShardContext
    from kernel.producer import Producer
    from kernel.pump import Pump
    from system_playbooks.orchestrate import plugin as orchestrate

    run_once, fetch, dispatch = Pump.run_once, Pump._fetch, Pump._dispatch

    async def timed_run_once(self: Pump, sub: Any, size: int) -> Any:
        rec: Record = {"consumer": self.durable, "asked": time.time_ns(), "size": size}
        token = _current.set(rec)
        try:
            return await run_once(self, sub, size)
        finally:
            _current.reset(token)
            if rec.get("msgs"):
                rec["end"] = time.time_ns()
                RECORDS.append(rec)

    async def timed_fetch(self: Pump, sub: Any, size: int) -> Any:
        msgs = await fetch(self, sub, size)
        rec = _current.get()
        if rec is not None:
            rec["fetched"] = time.time_ns()
            rec["msgs"] = [ack_tokens(m.reply) for m in msgs]
        return msgs

    async def timed_dispatch(self: Pump, events: Any) -> Any:
        rec = _current.get()
        t0 = time.time_ns()
        try:
            return await dispatch(self, events)
        finally:
            if rec is not None:
                rec["dispatch"] = (t0, time.time_ns())

    plan = getattr(orchestrate, "plan")  # noqa: B009 (imported by name into the plug-in's module, not exported: wrap it there)

    def timed_plan(*args: Any, **kwargs: Any) -> Any:
        rec = _current.get()
        t0 = time.time_ns()
        try:
            return plan(*args, **kwargs)
        finally:
            if rec is not None:
                rec.setdefault("plan", []).append((t0, time.time_ns()))

    Pump.run_once = timed_run_once  # type: ignore[method-assign]
    Pump._fetch = timed_fetch  # type: ignore[method-assign]
    Pump._dispatch = timed_dispatch  # type: ignore[method-assign]
    setattr(orchestrate, "plan", timed_plan)  # noqa: B010
    plugin = orchestrate.OrchestratePlugin
    plugin._publish = _timed("publish", plugin._publish)  # type: ignore[method-assign]
    # In the kernel only the orchestrator's _publish sends, confirms or re-publishes (a retry) events and commands.
    Producer.send = _timed("send", Producer.send)  # type: ignore[method-assign]
    ShardContext.send_command = _timed("send", ShardContext.send_command)  # type: ignore[method-assign]
    Producer.confirm = _timed("confirm", Producer.confirm)  # type: ignore[method-assign]
    ShardContext.confirm_command = _timed("confirm", ShardContext.confirm_command)  # type: ignore[method-assign]
    Producer._publish_prepared = _timed("republish", Producer._publish_prepared)  # type: ignore[method-assign]
    ShardContext.publish_command = _timed("republish", ShardContext.publish_command)  # type: ignore[method-assign]


OUTCOMES = ("step.exit", "call.error")


def install_worker_hooks() -> None:
    from kernel.producer import Producer
    from worker.worker import Worker

    process, publish = Worker._process, Producer.publish

    async def timed_process(self: Worker, d: Any) -> Any:
        seq, stored = ack_tokens(d.msg.reply)
        try:
            command = json.loads(d.msg.data)
        except ValueError:
            command = {}
        rec: Record = {"started": time.time_ns(), "cmd_stored": stored, "cmd_seq": seq,
                       "execution_id": command.get("execution_id"), "step": command.get("step")}  # fmt: skip
        token = _current.set(rec)
        try:
            return await process(self, d)
        finally:
            _current.reset(token)
            rec["end"] = time.time_ns()
            RECORDS.append(rec)

    async def timed_publish(self: Producer, env: Any) -> Any:
        # A wasm tool publishes its user.* events from inside the run: only the outcome is a segment.
        rec = _current.get()
        t0 = time.time_ns()
        try:
            return await publish(self, env)
        finally:
            if rec is not None and env.type in OUTCOMES:
                rec["outcome"] = (t0, time.time_ns())

    Worker._process = timed_process  # type: ignore[method-assign]
    Worker._run = _timed("run", Worker._run)  # type: ignore[method-assign]
    Producer.publish = timed_publish  # type: ignore[method-assign]
    Producer.send = _timed("claim", Producer.send)  # type: ignore[method-assign]
    Producer.confirm = _timed("confirm", Producer.confirm)  # type: ignore[method-assign]


def serve(role: str, out: str, argv: Sequence[str]) -> int:
    """Run ``noetl-edge <argv>`` with the ``role``'s hooks; write the records to ``out`` when it returns."""
    from edge.cli import main

    {"kernel": install_kernel_hooks, "worker": install_worker_hooks}[role]()
    try:
        return main(list(argv))
    finally:
        Path(out).write_text(json.dumps(RECORDS), encoding="utf-8")


# --------------------------------------------------------------------------- analysis


def _ms(ns: float) -> float:
    return ns / 1e6


def _summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def _span(pairs: Sequence[Sequence[int]] | None) -> float:
    return sum(b - a for a, b in pairs or ())


SEGMENTS = {
    "pump_busy": "step.exit stored while the orchestrate pump was still on an earlier batch (its plug-in call, "
    "or the ack and bookkeeping after it)",
    "pump_delivery": "pull request out (or step.exit stored, if later) -> the pump's fetch returned it",
    "state_and_plan": "dispatch minus publish: grouping, state apply, plan, task switches",
    "plan": "the planner alone (included in state_and_plan)",
    "publish": "the orchestrator's _publish: first send -> last ack back (step.enter and command.issued to the "
    "WAL, then the command to CMD_<shard>, all queued on one connection before any ack is waited for)",
    "publish_send": "inside publish: queueing the events and the command (Producer.send, "
    "ShardContext.send_command: encode + publish_async, no ack waited for)",
    "publish_acks": "inside publish: waiting for their acks (Producer.confirm, ShardContext.confirm_command, "
    "including any re-publish after a missing ack)",
    "pump_ack": "after the plug-in returned: the batch's ack sent (not waited for) and the pump's bookkeeping",
    "cmd_delivery": "command stored in CMD_<shard> -> the worker's _process started on it",
    "claim_queued": "_process started -> command.claimed queued (decode, Producer.send: no ack waited for)",
    "run": "claim queued -> run done (Worker._run: the noop runner and its outcome event built)",
    "outcome_publish": "run done -> the outcome (step.exit) published and its ack back",
    "claim_confirm": "outcome acked -> the claim's ack confirmed (Producer.confirm; normally already back)",
    "worker_ack": "claim confirmed -> the command's ack_sync done (off the critical path)",
}


def _kernel_segments(seg: dict[str, list[float]], batch: Record, stored: int) -> None:
    """One step.exit's kernel segments from the orchestrate batch that delivered it."""
    seg["pump_busy"].append(_ms(max(0, batch["asked"] - stored)))
    seg["pump_delivery"].append(_ms(batch["fetched"] - max(batch["asked"], stored)))
    d0, d1 = batch["dispatch"]
    published = _span(batch.get("publish"))
    seg["state_and_plan"].append(_ms(d1 - d0 - published))
    if batch.get("plan"):
        seg["plan"].append(_ms(_span(batch["plan"])))
    if batch.get("publish"):
        seg["publish"].append(_ms(published))
        seg["publish_send"].append(_ms(_span(batch.get("send"))))
        seg["publish_acks"].append(_ms(_span(batch.get("confirm"))))
    seg["pump_ack"].append(_ms(batch["end"] - d1))


def _worker_segments(seg: dict[str, list[float]], rec: Record) -> bool:
    """One command's worker segments: claim queued -> run done -> outcome acked -> claim confirmed -> ack."""
    if not all(rec.get(k) for k in ("claim", "run", "outcome", "confirm")):
        return False  # dead-lettered after max_deliver: no claim, no run
    claimed, ran, outcome, confirmed = rec["claim"][-1][1], rec["run"][-1][1], rec["outcome"][1], rec["confirm"][-1][1]
    seg["cmd_delivery"].append(_ms(rec["started"] - rec["cmd_stored"]))
    seg["claim_queued"].append(_ms(claimed - rec["started"]))
    seg["run"].append(_ms(ran - claimed))
    seg["outcome_publish"].append(_ms(outcome - ran))
    seg["claim_confirm"].append(_ms(confirmed - outcome))
    seg["worker_ack"].append(_ms(rec["end"] - confirmed))
    return True


def analyse(
    kernel: Sequence[Record],
    workers: Sequence[Record],
    histories: Mapping[str, Sequence[tuple[int, int, str, str | None]]],
    *,
    orchestrate_consumer: str,
    window: tuple[int, int],
) -> dict[str, Any]:
    """Per-step segments (ms) of the measured executions from the hooks' records.

    ``histories``: execution id -> its WAL events as ``(seq, store ns, type, step)``;
    ``window``: the latency phase (ns), for the per-pump totals.
    """
    kernel = [r for r in kernel if window[0] <= r["fetched"] <= window[1]]
    batch_of: dict[int, Record] = {}
    for rec in kernel:
        if rec["consumer"] == orchestrate_consumer:
            for seq, _ in rec["msgs"]:
                batch_of[seq] = rec
    seg: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    exits = republished = 0
    for history in histories.values():
        for seq, stored, kind, _step in history:
            batch = batch_of.get(seq)
            if kind != "step.exit" or batch is None or "dispatch" not in batch:
                continue
            exits += 1
            republished += len(batch.get("republish", ()))
            _kernel_segments(seg, batch, stored)
    commands = sum(_worker_segments(seg, r) for r in workers if r.get("execution_id") in histories)
    consumers: dict[str, dict[str, float]] = {}
    for rec in kernel:
        c = consumers.setdefault(rec["consumer"], {"batches": 0, "events": 0, "dispatch_ms": 0.0, "ack_ms": 0.0})
        c["batches"] += 1
        c["events"] += len(rec["msgs"])
        if "dispatch" in rec:
            c["dispatch_ms"] += _ms(rec["dispatch"][1] - rec["dispatch"][0])
            c["ack_ms"] += _ms(rec["end"] - rec["dispatch"][1])
    return {
        "step_exits_matched": exits,
        "commands_matched": commands,
        # Events or commands the orchestrator published again because an ack did not come (0 on a healthy run).
        "orchestrator_republished": republished,
        "segments_ms": {k: _summary(v) | {"what": SEGMENTS[k]} for k, v in seg.items() if v},
        "window_s": round((window[1] - window[0]) / 1e9, 3),
        # Every pump of the kernel shares one event loop: their dispatch and ack time over the phase.
        "pumps": {k: {n: round(x, 1) for n, x in v.items()} for k, v in sorted(consumers.items())},
    }
