"""``noetl-edge events tail``: print WAL events live, one line (or JSON object) per event.

One ordered push consumer per shard reads the shard's WAL stream with the
narrowest subject filter the flags allow (``wal.<shard>.<tenant>.<project>.>``);
a ``--type`` glob that is a plain subject pattern is matched by the server too,
any other glob only here (:func:`type_filter`). Payloads and summaries are
scrubbed; a poison message is named on stderr and the tail goes on.

>>> plan = TailPlan(shards=(0, 1, 2, 3), tenant="acme", type_glob="step.*")
>>> plan.subject(2), plan.shown()
('wal.2.acme.*.*.step.>', 'wal.*.acme.*.*.step.>')
>>> plan.wants("wal.2.acme.web.7.step.exit"), plan.wants("wal.2.acme.web.7.user.note")
(True, False)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from edge.cli.options import UsageError, objects_root, resolve_topology
from edge.cli.output import EXIT_OK, print_json
from kernel.bootstrap import check_topology
from kernel.connect import close, connect
from kernel.errors import KernelError
from kernel.scrub import scrub, scrub_envelope, scrub_text
from locator.envelope import Envelope, EnvelopeError, decode_wal_message, poison_reason
from locator.names import check_name
from locator.subjects import wal_stream
from locator.topology import Topology
from projector.archive import ArchiveError, HistoryArchive
from projector.timeline import summarize
from projector.walread import StoredMessage

IDLE_FLUSH_S = 0.5  # with --since-seq: archived messages left once the WAL has been quiet this long are printed
_GLOB_CHARS = frozenset("*?[]")
_SUBJECT_BAD = frozenset(" \t\r\n>")
STYLES = {  # colour by the type's family (first token) or the whole type; TTY only
    "execution": "bold", "step": "cyan", "command": "blue", "callback": "magenta", "user": "green",
    "call.error": "bold red", "step.failed": "bold red", "execution.failed": "bold red",
    "step.retry": "yellow", "execution.completed": "bold green", "execution.cancelled": "bold yellow",
}


def type_filter(glob: str) -> str | None:
    """The subject tokens selecting exactly the types ``glob`` matches, or None if only fnmatch can.

    Literal tokens, optionally ending in a lone ``*`` (which in fnmatch spans dots, like ``>``).

    >>> type_filter("step.exit"), type_filter("user.*"), type_filter("*")
    ('step.exit', 'user.>', '>')
    >>> [type_filter(g) for g in ("step.e*", "user.*.done", "step?exit")]
    [None, None, None]
    """
    tokens = glob.split(".")
    *head, last = tokens
    if any(not t or _GLOB_CHARS & set(t) or _SUBJECT_BAD & set(t) for t in head):
        return None
    if last == "*":
        return ".".join([*head, ">"])
    if not last or _GLOB_CHARS & set(last) or _SUBJECT_BAD & set(last):
        return None
    return glob


class TailPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What to tail: the shards, the server-side filter per shard and the client-side type glob."""

    shards: tuple[int, ...]
    tenant: str | None = None
    project: str | None = None
    type_glob: str | None = None
    since_seq: int | None = None
    count: int | None = None
    jsonl: bool = False

    def _filter(self, shard: str) -> str:
        server_type = type_filter(self.type_glob) if self.type_glob else None
        names = [t for t in (self.tenant, self.project) if t]
        if server_type is None:
            return ".".join(["wal", shard, *names, ">"])
        return ".".join(["wal", shard, self.tenant or "*", self.project or "*", "*", server_type])

    def subject(self, shard: int) -> str:
        """The subject filter of ``shard``'s consumer."""
        return self._filter(str(shard))

    def shown(self) -> str:
        """The filter as the ready line names it (``*`` for the shard when there are several)."""
        return self.subject(self.shards[0]) if len(self.shards) == 1 else self._filter("*")

    def wants(self, subject: str) -> bool:
        """The client-side ``--type`` check, on the subject's type (the envelope's, once it decoded)."""
        if self.type_glob is None:
            return True
        parts = subject.split(".", 5)
        return len(parts) == 6 and fnmatchcase(parts[5], self.type_glob)


def plan_tail(args: argparse.Namespace, topology: Topology) -> TailPlan:
    """Validate the flags into a :class:`TailPlan`; a bad one raises (exit 2) before anything connects."""
    tenant = None if args.tenant is None else check_name("tenant", args.tenant)
    project = None if args.project is None else check_name("project", args.project)
    if project is not None and tenant is None:
        raise UsageError("--project needs --tenant (a project name is only unique within its tenant)")
    if args.shard is not None and not 0 <= args.shard < topology.shard_count:
        raise UsageError(f"--shard {args.shard} is out of range: the topology has shards 0-{topology.shard_count - 1}")
    if args.since_seq is not None:
        if args.shard is None:
            raise UsageError("--since-seq needs --shard (each shard's WAL has its own sequence)")
        if args.since_seq < 1:
            raise UsageError(f"--since-seq must be >= 1, got {args.since_seq}")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    if args.type is not None and (not args.type or _SUBJECT_BAD & set(args.type)):
        raise UsageError(f"--type {args.type!r} is not a type glob such as 'step.*' or 'user.*'")
    shards = (args.shard,) if args.shard is not None else tuple(range(topology.shard_count))
    return TailPlan(shards=shards, tenant=tenant, project=project, type_glob=args.type,
                    since_seq=args.since_seq, count=args.count, jsonl=args.jsonl)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one or more tokens).

    >>> subject_matches("wal.2.acme.*.*.step.>", "wal.2.acme.web.7.step.exit")
    True
    >>> subject_matches("wal.2.acme.>", "wal.2.other.web.7.user.x"), subject_matches("wal.2.*", "wal.2.a.b")
    (False, False)
    """
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


def archived_since(archive: HistoryArchive, shard: int, plan: TailPlan, since: int) -> list[StoredMessage]:
    """The shard's archived messages with seq >= ``since`` that the tail's filters select, in seq order.

    A message found in two segments (one a crash left behind, never recorded) is listed once.
    """
    pattern = plan.subject(shard)
    found: dict[int, StoredMessage] = {}
    for uri in archive.list_segments(shard):
        for m in archive.read_segment(uri):
            if m.seq >= since and subject_matches(pattern, m.subject) and plan.wants(m.subject):
                found.setdefault(m.seq, m)
    return [found[seq] for seq in sorted(found)]


def event_line(shard: int, seq: int, env: Envelope) -> str:
    """One plain-text line: shard, seq, time, tenant/project, execution, type, step, attempt, summary."""
    attempt = "-" if env.attempt is None else f"#{env.attempt}"
    return (f"{shard:>2} {seq:>7}  {env.ts}  {env.tenant}/{env.project}  {env.execution_id}  "
            f"{env.type:<26} {env.step or '-'} {attempt}  {scrub_text(summarize(env))}").rstrip()


class Printer:
    """Writes events to stdout: plain lines, rich colour on a TTY, or JSON lines; poison to stderr."""

    def __init__(self, *, jsonl: bool, colour: bool) -> None:
        self.jsonl = jsonl
        self.console: Any = None
        if colour and not jsonl:
            from rich.console import Console  # only a terminal pays for rich

            self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)

    def event(self, shard: int, seq: int, env: Envelope) -> None:
        env = scrub_envelope(env)
        if self.jsonl:
            print_json({"shard": shard, "seq": seq, "event": scrub(msgspec.to_builtins(env))})
        elif self.console is not None:
            from rich.text import Text

            style = STYLES.get(env.type) or STYLES.get(env.type.partition(".")[0], "")
            self.console.print(Text(event_line(shard, seq, env), style=style))
        else:
            sys.stdout.write(event_line(shard, seq, env) + "\n")
        sys.stdout.flush()

    @staticmethod
    def poison(shard: int, seq: int, error: EnvelopeError) -> None:
        print(f"noetl-edge: poison on shard {shard} seq {seq}: {poison_reason(error)}: {scrub_text(str(error))}",
              file=sys.stderr, flush=True)


def cell_groups(args: argparse.Namespace, topology: Topology, shards: Sequence[int]) -> list[tuple[list[str], list[int]]]:
    """(URLs, shards) per connection: one per cell holding some of ``shards``; ``--nats-url`` is one for all."""
    if getattr(args, "nats_url", None):
        return [([args.nats_url], list(shards))]
    return [(list(cell.urls), [s for s in shards if s in cell.shards])
            for cell in topology.cells if any(s in cell.shards for s in shards)]


async def require_streams(js: JetStreamContext, topology: Topology, shards: Sequence[int]) -> None:
    """Each shard's WAL stream exists and the server's shard count is the topology's, or one clear error."""
    for shard in shards:
        try:
            await js.stream_info(wal_stream(shard))
        except NotFoundError:
            raise KernelError(f"stream {wal_stream(shard)} does not exist: bootstrap the topology first "
                              "(`noetl-edge up` does it, or `noetl-edge cluster bootstrap`)") from None
    await check_topology(js, topology, shard=shards[0])  # another shard count: exit 2, naming it


async def _subscribe(nc: NATS, topology: Topology, plan: TailPlan, shards: list[int],
                     queue: asyncio.Queue[tuple[int, Msg]]) -> None:
    js = nc.jetstream()
    await require_streams(js, topology, shards)
    for shard in shards:
        async def put(msg: Msg, shard: int = shard) -> None:
            await queue.put((shard, msg))

        config = (ConsumerConfig(deliver_policy=DeliverPolicy.NEW) if plan.since_seq is None else
                  ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=plan.since_seq))
        await js.subscribe(plan.subject(shard), stream=wal_stream(shard), cb=put, ordered_consumer=True, config=config)


async def tail(args: argparse.Namespace, topology: Topology, plan: TailPlan) -> int:
    """Subscribe, say so on stderr, then print events until ``--count``, Ctrl-C, SIGTERM or a closed pipe."""
    queue: asyncio.Queue[tuple[int, Msg]] = asyncio.Queue(maxsize=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    printer = Printer(jsonl=plan.jsonl, colour=sys.stdout.isatty())
    connections: list[NATS] = []
    stopped = asyncio.ensure_future(stop.wait())
    try:
        for urls, shards in cell_groups(args, topology, plan.shards):
            connections.append(await connect(urls, name="noetl-events-tail"))
            await _subscribe(connections[-1], topology, plan, shards, queue)
        n = len(plan.shards)
        where = f"{n} shards" if n > 1 else f"shard {plan.shards[0]}"
        extra = f", type {plan.type_glob}" if plan.type_glob and type_filter(plan.type_glob) is None else ""
        since = f" from seq {plan.since_seq}" if plan.since_seq is not None else ""
        print(f"tailing {where} ({plan.shown()}{extra}){since} — Ctrl-C to stop", file=sys.stderr, flush=True)
        # With --since-seq, what system/cleanup archived comes first, interleaved with the WAL by seq.
        archived: list[StoredMessage] = []
        if plan.since_seq is not None:
            archive = HistoryArchive(objects_root(args))
            try:
                archived = await asyncio.to_thread(archived_since, archive, plan.shards[0], plan, plan.since_seq)
            except ArchiveError as e:
                raise KernelError(f"cannot read the history archive at {archive.root.base_url}: {e}") from e
        printed = 0

        def show(shard: int, seq: int, subject: str, data: bytes) -> bool:
            """Print one stored message; False once the reader is gone."""
            nonlocal printed
            try:
                env = decode_wal_message(subject, data, shard_count=topology.shard_count)
            except EnvelopeError as e:
                Printer.poison(shard, seq, e)
                return True
            try:
                printer.event(shard, seq, env)
            except BrokenPipeError:
                # `… | head`: the reader is gone; stop quietly (and let the exit flush go to /dev/null).
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return False
            printed += 1
            return True

        def flush(before: int | None) -> bool:
            """Print the archived messages older than ``before`` (all when None); False once done or gone."""
            while archived and (before is None or archived[0].seq <= before) and (plan.count is None or printed < plan.count):
                m = archived.pop(0)
                if before is not None and m.seq == before:
                    continue  # also still in the WAL (a crash between the record and the purge): shown once
                if not show(plan.shards[0], m.seq, m.subject, m.data):
                    return False
            return plan.count is None or printed < plan.count

        while plan.count is None or printed < plan.count:
            got = asyncio.ensure_future(queue.get())
            waiters: set[asyncio.Future[Any]] = {got, stopped}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=IDLE_FLUSH_S if archived else None)
            if not got.done():
                got.cancel()
                if stopped.done():
                    break
                if not flush(None):  # the WAL is quiet: every archived message is older than what comes next
                    break
                continue
            shard, msg = got.result()
            if not plan.wants(msg.subject):
                continue
            seq = msg.metadata.sequence.stream
            if not flush(seq) or not show(shard, seq, msg.subject, msg.data):
                break
        return EXIT_OK
    finally:
        stopped.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for nc in connections:
            await close(nc)


def run(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    plan = plan_tail(args, topology)
    return asyncio.run(tail(args, topology, plan))
