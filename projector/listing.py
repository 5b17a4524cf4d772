"""Listing executions newest first, from the visibility index and the compacted projection segments, in bounded pages.

A page asks every shard (a tenant/project spans shards through affinities) for
its executions below the cursor, newest first by ``(execution_id, shard)``:

- hot: the shard's :class:`~projector.visibility.VisibilityIndex`, walking its
  day directory newest first; a day is read whole when it holds at most the
  remaining budget of summaries, else hour by hour (an hour over the budget is
  read only when it is the first thing a page reads);
- archived: the shard's index of archived executions
  (:mod:`projector.archiveindex`: segments sorted by execution id, each record
  batch's id range in the manifest), record batches newest first.

Each shard stops once it has ``limit`` matching rows, or its budget
(:data:`HOT_BUDGET` summaries, :data:`COLD_BUDGET` record batches) is spent;
it then reports how far down it has seen everything. The page holds only rows
above the highest such boundary, so no row is skipped or repeated across
pages; a page may hold fewer than ``limit`` rows, and then carries a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.ipc

from projector.archiveindex import ArchiveError, ArchiveIndex, IndexManifest
from projector.errors import ProjectorError
from projector.objects import ObjectRoot
from projector.projection import decode_projection
from projector.visibility import ExecutionSummary, VisibilityIndex, day_start_id, summarize

HOT_BUDGET = 2000  # summaries one shard reads for one page
COLD_BUDGET = 32  # record batches (256 rows each) of the archived index one shard decodes for one page
NO_ID = 2**63  # above every execution id


class BadPageToken(ProjectorError):
    """A page token that this listing did not issue, or issued for other filters."""


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    """The filters of a listing. ``since_id`` is inclusive, ``until_id`` exclusive (ids bound creation time)."""

    tenant: str
    project: str
    statuses: tuple[str, ...] = ()
    playbook: str | None = None
    since_id: int = 0
    until_id: int = NO_ID
    limit: int = 50

    def matches(self, s: ExecutionSummary) -> bool:
        if self.statuses and s.status not in self.statuses:
            return False
        if self.playbook is not None and (s.playbook is None or s.playbook.path != self.playbook):
            return False
        return s.tenant == self.tenant and s.project == self.project and self.since_id <= int(s.execution_id) < self.until_id

    def fingerprint(self) -> str:
        parts = (self.tenant, self.project, ",".join(self.statuses), self.playbook or "", self.since_id, self.until_id)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class Cursor(NamedTuple):
    """Exclusive upper bound of the rows still to list, as ``(execution_id, shard)``."""

    id: int
    shard: int


class _Token(msgspec.Struct, frozen=True):
    v: int
    id: int
    shard: int
    q: str


def encode_token(cursor: Cursor, query: ListQuery) -> str:
    raw = msgspec.json.encode(_Token(1, cursor.id, cursor.shard, query.fingerprint()))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: ListQuery) -> Cursor:
    """The cursor of a token issued for ``query``; :class:`BadPageToken` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        t = msgspec.json.decode(raw, type=_Token)
    except (binascii.Error, ValueError, msgspec.DecodeError) as e:
        raise BadPageToken("page_token is not a token this listing issued (pass next_page_token as it was given)") from e
    if t.v != 1 or t.id < 0 or t.shard < 0:
        raise BadPageToken("page_token is not a token this listing issued (pass next_page_token as it was given)")
    if t.q != query.fingerprint():
        raise BadPageToken("page_token was issued for other filters: keep tenant, project, status, playbook, since and until")
    return Cursor(t.id, t.shard)


class ShardScan(NamedTuple):
    """Rows of one shard above ``boundary``, newest first; ids at or below ``boundary`` were not all seen (None: all were)."""

    rows: list[ExecutionSummary]
    boundary: int | None


def _next_day(day: str) -> str:
    return f"{datetime.strptime(day, '%Y%m%d').replace(tzinfo=UTC) + timedelta(days=1):%Y%m%d}"


async def scan_hot(index: VisibilityIndex, q: ListQuery, upper: int, *, budget: int = HOT_BUDGET) -> ShardScan:
    """The shard's hot summaries with ids in ``[q.since_id, upper)`` that match ``q``; see the module docstring."""
    rows: list[ExecutionSummary] = []
    read_any = False
    for day in await index.days(q.tenant, q.project):
        start, end = day_start_id(day), day_start_id(_next_day(day))
        if start >= upper:
            continue
        if end <= q.since_id:
            break
        if len(rows) >= q.limit or budget <= 0:
            return _newest_first(rows, min(upper, end) - 1)
        got = await index.read(q.tenant, q.project, day, None, at_most=budget)
        if got is None:  # too many for the budget: hour by hour
            for hour in range(23, -1, -1):
                h_start = day_start_id(day, f"{hour:02d}")
                h_end = end if hour == 23 else day_start_id(day, f"{hour + 1:02d}")
                if h_start >= upper or h_end <= q.since_id:
                    continue
                if len(rows) >= q.limit or (read_any and budget <= 0):
                    return _newest_first(rows, min(upper, h_end) - 1)
                got = await index.read(q.tenant, q.project, day, f"{hour:02d}", at_most=budget if read_any else NO_ID)
                if got is None:
                    return _newest_first(rows, min(upper, h_end) - 1)
                read_any = True
                budget -= len(got)
                rows += [s for s in got if int(s.execution_id) < upper and q.matches(s)]
            continue
        read_any = True
        budget -= len(got)
        rows += [s for s in got if int(s.execution_id) < upper and q.matches(s)]
    return _newest_first(rows, None)


def _newest_first(rows: list[ExecutionSummary], boundary: int | None) -> ShardScan:
    return ShardScan(sorted(rows, key=lambda s: int(s.execution_id), reverse=True), boundary)


class _Chunk(NamedTuple):
    high: int
    low: int
    segment: str
    batch: int


def _chunks(manifest: IndexManifest, lower: int, upper: int) -> list[_Chunk]:
    """The record batches of the index segments that may hold ids in ``[lower, upper)``, newest first."""
    chunks = [
        _Chunk(high, low, s.segment, i)
        for s in manifest.segments
        for i, (low, high) in enumerate(s.batches)
        if high >= lower and low < upper
    ]
    return sorted(chunks, reverse=True)


def _read_batch(root: ObjectRoot, chunk: _Chunk) -> list[dict[str, Any]]:
    try:
        with root.fs.open(root.path_of(chunk.segment), "rb", cache_type="none") as f:
            batch = pyarrow.ipc.open_file(f).get_batch(chunk.batch)
            rows: list[dict[str, Any]] = batch.select(["execution_id", "tenant", "project", "status", "last_seq", "projection"]).to_pylist()
            return rows
    except FileNotFoundError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ArchiveError(f"could not read index segment {chunk.segment}: {e}") from e


def _scan_archived(root: ObjectRoot, manifest: IndexManifest, q: ListQuery, upper: int, budget: int) -> ShardScan:
    chunks = _chunks(manifest, q.since_id, upper)
    found: dict[int, tuple[int, ExecutionSummary]] = {}
    for i, chunk in enumerate(chunks):
        for row in _read_batch(root, chunk):
            if row["tenant"] != q.tenant or row["project"] != q.project or not row["status"]:
                continue  # another tenant's, or a row with no projection (its history was all poison)
            x = int(row["execution_id"])
            seen = found.get(x)
            if x < upper and (seen is None or row["last_seq"] > seen[0]):  # archived twice: the newest row
                found[x] = (row["last_seq"], summarize(decode_projection(row["projection"])))
        if i + 1 < len(chunks):
            below = chunks[i + 1].high  # what is not read yet lies at or below this
            done = sorted((x for x, (_, s) in found.items() if x > below and q.matches(s)), reverse=True)
            if len(done) >= q.limit or i + 1 >= budget:
                return ShardScan([found[x][1] for x in done], below)
    return ShardScan([s for x, (_, s) in sorted(found.items(), reverse=True) if q.matches(s)], None)


async def scan_archived(index: ArchiveIndex, q: ListQuery, upper: int, *, budget: int = COLD_BUDGET) -> ShardScan:
    """The shard's archived executions (its index of archived executions) with ids in ``[q.since_id, upper)`` matching ``q``."""
    manifest = await index.manifest(newer_than=time.monotonic())
    if not manifest.segments or index.root is None:
        return ShardScan([], None)
    try:
        return await asyncio.to_thread(_scan_archived, index.root, manifest, q, upper, budget)
    except FileNotFoundError:
        # An index segment merged and deleted after its grace period while this page was read: once more, current.
        manifest = await index.manifest(newer_than=time.monotonic())
        try:
            return await asyncio.to_thread(_scan_archived, index.root, manifest, q, upper, budget)
        except FileNotFoundError as e:
            raise ArchiveError(f"an index segment of shard {index.shard} vanished twice while listing: {e}") from e


ShardSource = Callable[[int], Awaitable[tuple[VisibilityIndex, ArchiveIndex]]]


async def scan_shard(hot_index: VisibilityIndex, archived: ArchiveIndex, q: ListQuery, upper: int) -> ShardScan:
    """Hot and archived rows of one shard, merged (a row in both is shown once, as the hot one)."""
    hot, cold = await asyncio.gather(
        scan_hot(hot_index, q, upper, budget=HOT_BUDGET), scan_archived(archived, q, upper, budget=COLD_BUDGET)
    )
    boundary = max((b for b in (hot.boundary, cold.boundary) if b is not None), default=None)
    merged = {int(s.execution_id): s for s in cold.rows}
    merged.update({int(s.execution_id): s for s in hot.rows})
    keep = [merged[x] for x in sorted(merged, reverse=True) if boundary is None or x > boundary]
    return ShardScan(keep, boundary)


async def list_page(
    source: ShardSource, shards: Sequence[int], q: ListQuery, cursor: Cursor | None
) -> tuple[list[ExecutionSummary], Cursor | None]:
    """One page of ``q`` below ``cursor`` across ``shards``, and the cursor of the next page (None: no more)."""

    async def one(shard: int) -> ShardScan:
        upper = q.until_id
        if cursor is not None:
            upper = min(upper, cursor.id + 1 if shard < cursor.shard else cursor.id)
        if upper <= q.since_id:
            return ShardScan([], None)
        hot_index, archived = await source(shard)
        return await scan_shard(hot_index, archived, q, upper)

    scans = await asyncio.gather(*(one(s) for s in shards))
    bounds = [(scan.boundary, shard) for shard, scan in zip(shards, scans, strict=True) if scan.boundary is not None]
    floor = max(bounds, default=None)
    rows = sorted(
        ((int(s.execution_id), shard, s) for shard, scan in zip(shards, scans, strict=True) for s in scan.rows
         if floor is None or (int(s.execution_id), shard) > floor),
        key=lambda r: (r[0], r[1]),
        reverse=True,
    )  # fmt: skip
    page = rows[: q.limit]
    if len(rows) > q.limit:
        return [r[2] for r in page], Cursor(page[-1][0], page[-1][1])
    if floor is not None:
        assert floor[0] is not None
        return [r[2] for r in page], Cursor(floor[0], floor[1] + 1)
    return [r[2] for r in page], None
