"""``noetl-edge history stats|archive``: the tiers of history, and archiving ended executions now.

``stats`` prints, per shard, what the WAL, the KV buckets and the object store
hold (see :mod:`projector.historystats`): rich tables on a terminal, JSON
otherwise or with ``--json``. ``archive --now`` archives every execution
whose terminal event is in the WAL, whatever ``NOETL_HISTORY_RETENTION``
says, with the same :class:`projector.archive.Archiver` ``system/cleanup``
uses, so it is safe while kernels run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from edge.cli.events import cell_groups, require_streams
from edge.cli.options import UsageError, objects_root, resolve_topology
from edge.cli.output import EXIT_OK, print_json
from kernel.connect import close, connect
from kernel.errors import KernelError
from kernel.host import PluginError
from locator.names import check_name
from locator.topology import Topology
from projector.archive import ArchiveError, ArchiveReport, Archiver, HistoryArchive
from projector.historystats import HistoryStats, ShardStats, ended_executions, idle_executions, object_figures, shard_stats
from projector.objects import ObjectRoot
from system_playbooks.cleanup.plugin import RetentionPolicy

log = structlog.get_logger("noetl.cli.history")

ARCHIVE_ATTEMPTS = 5  # a batch that met another archiver (a kernel's system/cleanup) is tried again


class ShardArchive(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    executions: int
    messages: int
    segments: list[str]
    left: int = 0  # ended, but system/project has not folded them to their last event yet


class ArchiveSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What ``history archive --now`` moved: totals, then each shard with the segments it wrote."""

    executions: int
    messages: int
    segments: int
    shards: list[ShardArchive]
    left: int = 0

    def line(self) -> str:
        """The closing line.

        >>> ArchiveSummary(executions=2, messages=9, segments=1, shards=[]).line()
        'archived 2 executions, 9 messages, 1 segments'
        >>> ArchiveSummary(executions=2, messages=9, segments=1, shards=[], left=3).line()
        'archived 2 executions, 9 messages, 1 segments; left 3 not handled by the kernel yet (run it again later)'
        """
        line = f"archived {self.executions} executions, {self.messages} messages, {self.segments} segments"
        if self.left:
            line += f"; left {self.left} not handled by the kernel yet (run it again later)"
        return line


def selected_shards(args: argparse.Namespace, topology: Topology) -> list[int]:
    if args.shard is not None and not 0 <= args.shard < topology.shard_count:
        raise UsageError(f"--shard {args.shard} is out of range: the topology has shards 0-{topology.shard_count - 1}")
    return [args.shard] if args.shard is not None else list(range(topology.shard_count))


@contextlib.asynccontextmanager
async def _cell(urls: list[str], topology: Topology, shards: Sequence[int], name: str) -> Any:
    """A JetStream context on the cell holding ``shards``, once its streams match the topology."""
    nc = await connect(urls, name=name)
    try:
        js = nc.jetstream(timeout=30)
        await require_streams(js, topology, shards)
        yield js
    except NotFoundError as e:
        raise KernelError(f"a stream or bucket is missing on {', '.join(urls)}: {e.description} (bootstrap first)") from e
    except nats.errors.Error as e:
        raise KernelError(f"NATS at {', '.join(urls)} did not answer: {str(e) or type(e).__name__}") from e
    finally:
        await close(nc)


# -- stats -------------------------------------------------------------------------------------------------------


async def gather_stats(args: argparse.Namespace, topology: Topology, shards: list[int], root: ObjectRoot) -> HistoryStats:
    found: list[ShardStats] = []
    for urls, group in cell_groups(args, topology, shards):
        async with _cell(urls, topology, group, "noetl-history-stats") as js:
            for shard in group:
                found.append(await shard_stats(js, shard, root))
    results = await asyncio.to_thread(object_figures, root, "results", recursive=True) if args.results else None
    return HistoryStats(objects_url=root.base_url, shards=sorted(found, key=lambda s: s.shard), results=results)


def _size(n: int | None) -> str:
    """Bytes for a human.

    >>> [_size(0), _size(1536), _size(5 * 1024**3), _size(None)]
    ['0 B', '1.5 KiB', '5.0 GiB', '-']
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def stats_tables(stats: HistoryStats) -> list[Any]:
    """Two tables: executions and the WAL, then the KV buckets and the objects."""
    from rich.table import Table

    wal = Table("shard", "executions in WAL", "ended in WAL", "archived", "messages", "bytes", "subjects",
                "first seq", "last seq", "interior deletes", title="executions and the WAL")  # fmt: skip
    tiers = Table("shard", "proj keys", "proj bytes", "hist keys", "hist bytes", "history segments", "history bytes",
                  "snapshot segments", "snapshot bytes", title=f"KV buckets and objects ({stats.objects_url})")  # fmt: skip
    for s in stats.shards:
        w = s.wal
        wal.add_row(str(s.shard), str(s.executions_in_wal), str(s.ended_in_wal), str(s.executions_archived or 0),
                    str(w.messages), _size(w.bytes), str(w.subjects), str(w.first_seq), str(w.last_seq), str(w.deleted))  # fmt: skip
        tiers.add_row(
            str(s.shard), str(s.proj.keys) if s.proj else "-", _size(s.proj.bytes if s.proj else None),
            str(s.hist.keys) if s.hist else "-", _size(s.hist.bytes if s.hist else None),
            str(s.history_segments.objects), _size(s.history_segments.bytes),
            str(s.snapshot_segments.objects), _size(s.snapshot_segments.bytes),
        )  # fmt: skip
    return [wal, tiers]


def _stats(args: argparse.Namespace) -> int:
    topology = resolve_topology(args)
    shards = selected_shards(args, topology)
    root = objects_root(args)
    try:
        stats = asyncio.run(gather_stats(args, topology, shards, root))
    except OSError as e:
        raise KernelError(f"could not list the object store {root.base_url}: {e}") from e
    if args.json or not sys.stdout.isatty():
        print_json(stats)
        return EXIT_OK
    from rich.console import Console

    console = Console(width=200, highlight=False)
    for table in stats_tables(stats):
        console.print(table)
    if stats.results is not None:
        console.print(f"results: {stats.results.objects} objects, {_size(stats.results.bytes)}")
    return EXIT_OK


# -- archive -----------------------------------------------------------------------------------------------------


class Progress:
    """A bar on stderr when it is a terminal; its total grows as ended executions are found."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        if not sys.stderr.isatty():
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        columns = (TextColumn("archiving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Bar(*columns, console=Console(file=sys.stderr), transient=True) as bar:
            self._bar, self._task = bar, bar.add_task("archiving", total=0)
            yield self

    def found(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=self._bar.tasks[0].total + n)

    def done(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


async def _archive_batch(archiver: Archiver, batch: list[tuple[str, str, str]]) -> ArchiveReport:
    for attempt in range(1, ARCHIVE_ATTEMPTS + 1):
        try:
            return await archiver.archive_executions(batch)
        except ArchiveError as e:
            # Another archiver recorded a ref first, or the store failed: a re-run skips what is archived.
            if attempt == ARCHIVE_ATTEMPTS:
                raise KernelError(f"shard {archiver.shard}: {e} (after {attempt} attempts; run it again)") from e
            log.warning("history.archive_retry", shard=archiver.shard, attempt=attempt, error=str(e))
    raise AssertionError("unreachable")


async def archive_shard(
    js: JetStreamContext, shard: int, archive: HistoryArchive, *, shard_count: int, tenant: str | None,
    project: str | None, batch: int, progress: Progress, idle_s: float | None = None,
) -> ShardArchive:  # fmt: skip
    """Archive the shard's ended executions, ``batch`` per segment, until a fresh look finds none not tried.

    The look is repeated because the subject listing is paged: a kernel's
    cleanup purging at the same time can move a page boundary past a subject.
    """
    archiver = Archiver(js, shard=shard, shard_count=shard_count, archive=archive)
    tried: set[tuple[str, str, str]] = set()
    executions = messages = left = 0
    segments: list[str] = []
    while True:
        found = await ended_executions(js, shard, tenant=tenant, project=project)
        if idle_s is not None:
            found += await idle_executions(js, shard, idle_s=idle_s, tenant=tenant, project=project)
        new = [x for x in found if x not in tried]
        if not new:
            return ShardArchive(shard=shard, executions=executions, messages=messages, segments=segments, left=left)
        tried.update(new)
        progress.found(len(new))
        for i in range(0, len(new), batch):
            chunk = new[i : i + batch]
            report = await _archive_batch(archiver, chunk)
            executions += report.executions
            messages += report.messages
            left += report.unfolded
            if report.segment is not None:
                segments.append(report.segment)
                log.info("history.archived", shard=shard, executions=report.executions, messages=report.messages,
                         segment=report.segment)  # fmt: skip
            progress.done(len(chunk))


async def archive_now(args: argparse.Namespace, topology: Topology, shards: list[int], archive: HistoryArchive,
                      tenant: str | None, project: str | None, idle_s: float | None = None) -> ArchiveSummary:  # fmt: skip
    done: list[ShardArchive] = []
    with Progress().shown() as progress:
        for urls, group in cell_groups(args, topology, shards):
            async with _cell(urls, topology, group, "noetl-history-archive") as js:
                for shard in group:
                    done.append(await archive_shard(js, shard, archive, shard_count=topology.shard_count, tenant=tenant, project=project,
                                                    batch=args.batch, progress=progress, idle_s=idle_s))  # fmt: skip
    done.sort(key=lambda s: s.shard)
    return ArchiveSummary(
        executions=sum(s.executions for s in done), messages=sum(s.messages for s in done),
        segments=sum(len(s.segments) for s in done), shards=done, left=sum(s.left for s in done),
    )  # fmt: skip


def _archive(args: argparse.Namespace) -> int:
    tenant = None if args.tenant is None else check_name("tenant", args.tenant)
    project = None if args.project is None else check_name("project", args.project)
    if project is not None and tenant is None:
        raise UsageError("--project needs --tenant (a project name is only unique within its tenant)")
    if not 1 <= args.batch <= 100_000:
        raise UsageError(f"--batch must be 1..100000, got {args.batch}")
    idle_s = None
    if args.idle is not None:
        try:
            idle_s = RetentionPolicy.parse(args.idle).seconds
        except PluginError as e:
            raise UsageError(str(e).replace("NOETL_HISTORY_RETENTION", "--idle")) from e
        if idle_s is None:
            raise UsageError("--idle needs a duration (30s, 12h, 7d…), not 'off': leave --idle out instead")
    topology = resolve_topology(args)
    shards = selected_shards(args, topology)
    archive = HistoryArchive(objects_root(args))
    summary = asyncio.run(archive_now(args, topology, shards, archive, tenant, project, idle_s))
    if args.json:
        print_json(summary)
    else:
        print(summary.line(), flush=True)
    return EXIT_OK


ACTIONS = {"stats": _stats, "archive": _archive}


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)
