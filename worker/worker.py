"""Data workers: pull commands from ``CMD_<shard>``, hand each to a runner, report the outcome on the WAL.

The worker is generic: it knows commands, deliveries and events, not tools
(the runner, e.g. ``worker.tools.runner.ToolRunner``, runs
them). It keeps no state between commands.

For delivery ``d`` of a command (``num_delivered`` of the message), the step
attempt is ``a = command.attempt + d - 1``, and the worker publishes to the
execution's WAL subject, with ``causation_id`` = the command id:

* ``command.claimed`` (``<command_id>:claimed:<d>``) before it runs the command;
* on success ``step.exit`` (``command.completed`` for a loop iteration), event
  id ``<execution_id>:<step>:<iteration or ->:result``: one success per step
  iteration, so a second delivery that also succeeds is a duplicate and is
  stored once. A result over the payload cap, or an Arrow table, goes to the
  :class:`~projector.results.ResultStore` and the event carries ``result_ref``;
* on failure ``call.error`` (``<command_id>:error:<d>``).

The command is acked only after that event is acknowledged by the WAL; while
the runner works, the message is kept alive with ``in_progress`` heartbeats, so
only a worker that died (or lost NATS) lets ``ack_wait`` expire and the
command go to another worker as the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
import nats.errors
import pyarrow as pa
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from kernel.bootstrap import check_topology
from kernel.connect import close, connect
from kernel.dlq import dead_letter
from kernel.errors import ConfigError
from kernel.producer import Producer
from kernel.runtime import default_holder
from locator.command import COMMAND_VERSION, DEFAULT_POOL, TIMER_POOL, Command, command_decoder
from locator.envelope import DEFAULT_PAYLOAD_CAP, Envelope, new_event
from locator.errors import LocatorError
from locator.subjects import cmd_stream, cmd_subject, pool_consumer
from locator.topology import Topology
from projector.results import ResultError, ResultKey, ResultStore

__all__ = ["CommandRunner", "Reported", "Worker", "WorkerSettings", "error_payload", "run_workers"]

log = structlog.get_logger("noetl.worker.worker")
tracer = trace.get_tracer("noetl.worker.worker")

MAX_ERROR_MESSAGE: Final = 4000
_payload_encoder: Final = msgspec.json.Encoder()


class CommandRunner(Protocol):
    """Runs one command as step attempt ``attempt``; returns a JSON value or a ``pyarrow.Table``.

    Whatever it raises is reported as ``call.error``: ``{"type": e.type, "message": str(e)}``
    when the exception has a string ``type`` attribute, else the exception's class name; a mapping
    ``report`` attribute adds its fields to the event's payload (e.g. which credentials the step used).
    """

    async def __call__(self, command: Command, *, attempt: int) -> Any: ...


@dataclass(frozen=True)
class Reported:
    """A runner's result with extra fields for its success event's payload (e.g. which plug-in version ran)."""

    value: Any
    payload: Mapping[str, Any]


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Consumer and reporting limits; ``NOETL_WORKER_ACK_WAIT`` and ``NOETL_WORKER_MAX_DELIVER`` in the environment.

    >>> WorkerSettings.from_env({"NOETL_WORKER_ACK_WAIT": "2.5"}).ack_wait
    2.5
    """

    ack_wait: float = 30.0
    max_deliver: int = 10
    fetch_wait: float = 1.0
    payload_cap: int = DEFAULT_PAYLOAD_CAP
    grace: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        raw = {"ack_wait": env.get("NOETL_WORKER_ACK_WAIT"), "max_deliver": env.get("NOETL_WORKER_MAX_DELIVER")}
        try:
            settings = msgspec.convert({k: v for k, v in raw.items() if v}, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"bad worker setting in the environment: {e}") from e
        return settings.checked()

    def checked(self) -> WorkerSettings:
        if not 0.1 <= self.ack_wait <= 3600:
            raise ConfigError(f"NOETL_WORKER_ACK_WAIT must be between 0.1 and 3600 seconds, got {self.ack_wait}")
        if not 1 <= self.max_deliver <= 1000:
            raise ConfigError(f"NOETL_WORKER_MAX_DELIVER must be between 1 and 1000, got {self.max_deliver}")
        return self


def error_payload(error: BaseException) -> dict[str, str]:
    """``{"type", "message"}`` of a runner's exception, the message cut to a size an event can carry."""
    kind = getattr(error, "type", None)
    message = str(error) or type(error).__name__
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 1] + "…"
    return {"type": kind if isinstance(kind, str) else type(error).__name__, "message": message}


class _Slots:
    """``concurrency`` run slots shared by every shard; a shard polls only while one is free."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._changed = asyncio.Condition()

    async def wait_free(self, stop: asyncio.Event) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0 or stop.is_set())

    async def take(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0)
            self.free -= 1

    async def give(self) -> None:
        async with self._changed:
            self.free += 1
            self._changed.notify_all()

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()


@dataclass(frozen=True)
class _Delivery:
    shard: int
    msg: Msg
    number: int  # num_delivered
    seq: int  # stream sequence in CMD_<shard>


class Worker:
    """Runs the commands of one pool on a set of shards, at most ``concurrency`` at a time.

    >>> # worker = Worker(js, topology, runner=ToolRunner(policy), results=ResultStore.from_env(data_dir=d))
    >>> # await worker.run(stop)
    """

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        runner: CommandRunner,
        results: ResultStore,
        pool: str = DEFAULT_POOL,
        concurrency: int = 4,
        shards: Iterable[int] | None = None,
        worker_id: str | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        if pool == TIMER_POOL:
            raise ConfigError(f"pool {TIMER_POOL!r} is reserved for the kernel's scheduler")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        try:
            cmd_subject(0, pool)
        except LocatorError as e:
            raise ConfigError(str(e)) from e
        self.js = js
        self.topology = topology
        self.runner = runner
        self.results = results
        self.pool = pool
        self.concurrency = concurrency
        self.shards = sorted(set(range(topology.shard_count) if shards is None else shards))
        self.worker_id = worker_id or default_holder()
        self.settings = (settings or WorkerSettings()).checked()
        self.durable = pool_consumer(pool)
        self.producer = Producer(js, topology, payload_cap=self.settings.payload_cap)
        self.log = log.bind(worker=self.worker_id, pool=pool)
        self._slots = _Slots(concurrency)
        self._running: set[asyncio.Task[None]] = set()

    # --- consuming --------------------------------------------------------------------------------

    async def _ensure_consumer(self, shard: int) -> None:
        await ensure_pool_consumer(self.js, shard, self.pool, self.settings)

    async def _subscribe(self, shard: int) -> JetStreamContext.PullSubscription:
        await self._ensure_consumer(shard)
        return await self.js.pull_subscribe_bind(self.durable, stream=cmd_stream(shard))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then let the commands in hand finish (at most ``grace`` seconds)."""
        await check_topology(self.js, self.topology, shard=self.shards[0] if self.shards else None)
        bind = getattr(self.runner, "bind", None)
        if callable(bind):  # a runner that needs NATS itself (WASM tools: the plug-in registry) shares this connection
            bind(self.js, self.topology)
        subs = {shard: await self._subscribe(shard) for shard in self.shards}
        loops = [asyncio.create_task(self._consume(shard, sub, stop)) for shard, sub in subs.items()]
        self.log.info("worker.started", shards=self.shards, concurrency=self.concurrency)
        try:
            await stop.wait()
            await self._slots.wake()
            await self._drain(loops)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for sub in subs.values():
                with contextlib.suppress(Exception):  # the connection may already be gone
                    await sub.unsubscribe()
            self.log.info("worker.stopped")

    async def _drain(self, loops: list[asyncio.Task[None]]) -> None:
        """Wait (at most ``grace``) for the loops to stop fetching and the commands in hand to finish."""
        deadline = asyncio.get_running_loop().time() + self.settings.grace
        await asyncio.wait(loops, timeout=self.settings.grace)
        while self._running and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        late = list(self._running)
        for task in late:  # not acked: their commands are redelivered after ack_wait
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            self.log.warning("worker.grace_expired", cancelled=len(late))

    async def _consume(self, shard: int, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while True:
            # Poll only while a slot is free: a fetched command then waits for none, or briefly.
            await self._slots.wait_free(stop)
            if stop.is_set():
                return
            try:
                msgs = await sub.fetch(1, timeout=self.settings.fetch_wait)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except (nats.errors.Error, ConnectionError) as e:
                self.log.warning("worker.fetch_failed", shard=shard, error=repr(e))
                await asyncio.sleep(0.5)
                with contextlib.suppress(nats.errors.Error, ConnectionError, asyncio.TimeoutError):
                    await self._ensure_consumer(shard)  # it may have been deleted; fetches find it by name
                continue
            for msg in msgs:
                heartbeat = asyncio.create_task(self._heartbeat(msg))
                try:
                    await self._slots.take()
                except asyncio.CancelledError:
                    heartbeat.cancel()  # stopped past the grace period: the command is redelivered
                    raise
                task = asyncio.create_task(self._handle(shard, msg, heartbeat))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _heartbeat(self, msg: Msg) -> None:
        interval = self.settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as e:  # NATS away: the command may be redelivered, which is safe
                self.log.warning("worker.heartbeat_failed", error=repr(e))

    async def _handle(self, shard: int, msg: Msg, heartbeat: asyncio.Task[None]) -> None:
        try:
            meta = msg.metadata
            await self._process(_Delivery(shard, msg, meta.num_delivered, meta.sequence.stream))
        except Exception as e:
            # Not acked: the command is redelivered after ack_wait (success events are idempotent).
            self.log.error("command.unreported", shard=shard, error=repr(e))
        finally:
            heartbeat.cancel()
            await self._slots.give()

    # --- one command ------------------------------------------------------------------------------

    def _event(self, command: Command, type: str, event_id: str, attempt: int, **fields: Any) -> Envelope:
        return new_event(
            tenant=command.tenant,
            project=command.project,
            affinity=command.affinity,
            execution_id=command.execution_id,
            type=type,
            step=command.step,
            attempt=attempt,
            event_id=event_id,
            causation_id=command.command_id,
            **fields,
        )

    def _decode(self, d: _Delivery) -> tuple[Command, Envelope]:
        """The command and its ``command.claimed`` event; raises ``ValueError`` if the message is poison."""
        command = command_decoder.decode(d.msg.data or b"")
        if command.v != COMMAND_VERSION:
            raise ValueError(f"unsupported command version v={command.v} (this worker reads v={COMMAND_VERSION})")
        if command.attempt < 1 or (command.iteration is not None and command.iteration < 0):
            raise ValueError(f"attempt must be >= 1 and iteration None or >= 0, got {command.attempt}, {command.iteration}")
        # Building the event validates every name and id the worker will publish under.
        claimed = self._event(
            command,
            "command.claimed",
            f"{command.command_id}:claimed:{d.number}",
            command.attempt + d.number - 1,
            payload={"command_id": command.command_id, "iteration": command.iteration, "delivery": d.number,
                     "worker": self.worker_id, "pool": self.pool},
        )  # fmt: skip
        return command, claimed

    async def _process(self, d: _Delivery) -> None:
        try:
            command, claimed = self._decode(d)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            await self._dead_letter(d, "invalid_command", str(e))
            await d.msg.ack_sync()
            return
        attempt = command.attempt + d.number - 1
        with (
            structlog.contextvars.bound_contextvars(
                execution_id=command.execution_id, step=command.step, command_id=command.command_id
            ),
            tracer.start_as_current_span(
                "worker.command",
                attributes={
                    "noetl.execution_id": command.execution_id,
                    "noetl.step": command.step,
                    "noetl.command_id": command.command_id,
                    "noetl.attempt": attempt,
                    "noetl.delivery": d.number,
                    "noetl.shard": d.shard,
                    "noetl.pool": self.pool,
                },
            ) as span,
        ):
            if d.number > self.settings.max_deliver:
                error = {
                    "type": "max_deliver",
                    "message": f"delivered {d.number} times without a reported outcome (workers died or lost NATS)",
                }
                await self.producer.publish(self._error_event(command, d, attempt, error))
                await self._dead_letter(d, "max_deliver", error["message"])
                span.set_status(Status(StatusCode.ERROR, "max_deliver"))
            else:
                # The claim is not waited for before the run: it and the outcome go to the same stream on
                # one connection, so the WAL stores them in this order; both acks are checked before the ack.
                claim = await self.producer.send(claimed)
                event = await self._run(command, d, attempt)
                await self.producer.publish(event)
                await self.producer.confirm(claim)
                if event.type == "call.error":
                    span.set_status(Status(StatusCode.ERROR, event.payload["error"]["type"]))
            await d.msg.ack_sync()

    async def _run(self, command: Command, d: _Delivery, attempt: int) -> Envelope:
        """Run the command and return the event that reports it (never raises for the command's own failure)."""
        try:
            async with asyncio.timeout(command.timeout) as deadline:
                value = await self.runner(command, attempt=attempt)
        except TimeoutError as e:
            if not deadline.expired():
                error = error_payload(e)
            else:
                error = {"type": "timeout", "message": f"the step did not finish within {command.timeout} s"}
            return self._failed(command, d, attempt, error)
        except Exception as e:
            report = getattr(e, "report", None)
            return self._failed(command, d, attempt, error_payload(e), report if isinstance(report, Mapping) else {})
        extra = value.payload if isinstance(value, Reported) else {}
        try:
            return await self._result_event(command, attempt, value)
        except ResultError as e:
            return self._failed(command, d, attempt, {"type": "result_store", "message": str(e)}, extra)
        except (TypeError, msgspec.EncodeError) as e:
            return self._failed(command, d, attempt, {"type": "bad_result", "message": f"result is not JSON: {e}"}, extra)

    def _failed(
        self, command: Command, d: _Delivery, attempt: int, error: dict[str, str], extra: Mapping[str, Any] | None = None
    ) -> Envelope:
        self.log.info("command.failed", attempt=attempt, error_type=error["type"], error=error["message"][:200])
        return self._error_event(command, d, attempt, error, extra)

    def _error_event(
        self, command: Command, d: _Delivery, attempt: int, error: dict[str, str], extra: Mapping[str, Any] | None = None
    ) -> Envelope:
        payload = {**(extra or {}), "error": error, "iteration": command.iteration, "command_id": command.command_id}
        return self._event(command, "call.error", f"{command.command_id}:error:{d.number}", attempt, payload=payload)

    async def _result_event(self, command: Command, attempt: int, value: Any) -> Envelope:
        iteration = command.iteration
        kind = "step.exit" if iteration is None else "command.completed"
        event_id = f"{command.execution_id}:{command.step}:{'-' if iteration is None else iteration}:result"
        extra: Mapping[str, Any] = {}
        if isinstance(value, Reported):
            value, extra = value.value, value.payload
        payload: dict[str, Any] = {"result": value, "iteration": iteration, "command_id": command.command_id, **extra}
        if not isinstance(value, pa.Table) and len(_payload_encoder.encode(payload)) <= self.settings.payload_cap:
            self.log.debug("command.done", attempt=attempt)
            return self._event(command, kind, event_id, attempt, payload=payload)
        key = ResultKey(command.tenant, command.project, command.execution_id, command.step, iteration, attempt)
        stored = await asyncio.to_thread(self.results.put, key, value)
        self.log.info("command.done", attempt=attempt, result_ref=stored.ref, result_bytes=stored.size)
        payload = {"result": None, "iteration": iteration, "command_id": command.command_id, "result_bytes": stored.size,
                   **extra}  # fmt: skip
        return self._event(command, kind, event_id, attempt, payload=payload, result_ref=stored.ref)

    async def _dead_letter(self, d: _Delivery, reason: str, detail: str) -> None:
        stream = cmd_stream(d.shard)
        await dead_letter(
            self.js, d.msg, shard=d.shard, stream=stream, seq=d.seq, consumer=self.durable, reason=reason,
            detail=detail, msg_id=f"dlq:{stream}:{d.seq}",
        )  # fmt: skip
        self.log.warning("dlq", reason=reason, shard=d.shard, seq=d.seq, detail=detail[:200])


async def ensure_pool_consumer(js: JetStreamContext, shard: int, pool: str, settings: WorkerSettings) -> None:
    """Create or update ``pool``'s durable consumer on the shard's command stream (every worker of it shares it)."""
    durable = pool_consumer(pool)
    config = ConsumerConfig(
        name=durable,
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait,
        # The worker files a command in the DLQ at delivery max_deliver + 1; the server's
        # limit is only the backstop should that filing fail too.
        max_deliver=settings.max_deliver + 1,
        filter_subject=cmd_subject(shard, pool),
    )
    await js.add_consumer(cmd_stream(shard), config)


async def prepare_pool(
    urls: Sequence[str], topology: Topology, *, pool: str, settings: WorkerSettings | None = None
) -> list[int]:
    """Create ``pool``'s consumers on every shard and return the shards, running nothing.

    What an autoscaler that starts a pool from zero workers needs first: it
    reads the pool's lag from those consumers, which a worker otherwise creates
    only when it starts (``noetl-edge worker --pool NAME --prepare``).
    """
    if pool == TIMER_POOL:
        raise ConfigError(f"pool {TIMER_POOL!r} is reserved for the kernel's scheduler")
    settings = (settings or WorkerSettings.from_env()).checked()
    nc = await connect(urls, name=f"noetl-worker-prepare-{pool}")
    try:
        js = nc.jetstream()
        await check_topology(js, topology)
        shards = list(range(topology.shard_count))
        for shard in shards:
            await ensure_pool_consumer(js, shard, pool, settings)
        return shards
    finally:
        await close(nc)


async def run_workers(
    urls: Sequence[str],
    topology: Topology,
    *,
    runner: CommandRunner,
    results: ResultStore,
    stop: asyncio.Event,
    pool: str = DEFAULT_POOL,
    concurrency: int = 4,
    shards: Iterable[int] | None = None,
    worker_id: str | None = None,
    settings: WorkerSettings | None = None,
) -> None:
    """Connect to ``urls`` and run a :class:`Worker` until ``stop`` is set (what ``noetl-edge worker`` runs).

    ``settings`` defaults to :meth:`WorkerSettings.from_env`. Raises
    :class:`~kernel.errors.KernelError` when NATS cannot be reached or the
    server's topology differs, :class:`~kernel.errors.ConfigError` for a bad setting.
    """
    settings = settings or WorkerSettings.from_env()
    worker_id = worker_id or default_holder()
    nc = await connect(urls, name=f"noetl-worker-{worker_id}")
    try:
        worker = Worker(
            nc.jetstream(), topology, runner=runner, results=results, pool=pool, concurrency=concurrency,
            shards=shards, worker_id=worker_id, settings=settings,
        )  # fmt: skip
        await worker.run(stop)
    finally:
        await close(nc)
