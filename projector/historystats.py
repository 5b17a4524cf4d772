"""What ``noetl-edge history stats`` and the edge's ``/metrics`` report about the tiers of history.

Per shard: the WAL stream as the server counts it (messages, bytes, subjects,
seq range, interior deletes), the executions whose subjects it holds, the KV
buckets ``proj_<n>`` and ``hist_<n>`` (keys, bytes), and the objects under
``history/shard=<n>/`` and ``segments/shard=<n>/``. Every NATS figure is the
server's own answer to ``STREAM.INFO`` (nats-py's ``StreamState`` drops
``num_subjects`` and the paging fields, so the request is made here); none is
derived from what a client saw.

>>> execution_of("wal.3.acme.web.42.step.exit")
('acme', 'web', '42')
>>> terminal_filter(3, "acme", None, "execution.failed")
'wal.3.acme.*.*.execution.failed'
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from locator.subjects import hist_bucket, proj_bucket, wal_stream, wal_subjects
from projector.archiveindex import ArchiveIndex
from projector.objects import ObjectRoot

# The events that end an execution: what system/cleanup's consumer sees and `history archive --now` looks for.
TERMINAL_TYPES = ("execution.completed", "execution.failed", "execution.cancelled")


class StreamFigures(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's state as the server reports it (``deleted``: interior deletes, e.g. purged histories)."""

    messages: int
    bytes: int
    subjects: int
    first_seq: int
    last_seq: int
    deleted: int


class BucketFigures(msgspec.Struct, frozen=True, kw_only=True):
    """A KV bucket (history 1): ``keys`` is its stream's subject count, so a delete marker counts as a key."""

    keys: int
    bytes: int


class ObjectFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Finished objects (hidden temp files of writes under way are left out) and their total size."""

    objects: int
    bytes: int


class ShardStats(msgspec.Struct, frozen=True, kw_only=True):
    """One shard across the tiers. ``None``: a bucket that does not exist (bootstrapped before it was added)."""

    shard: int
    wal: StreamFigures
    executions_in_wal: int  # distinct (tenant, project, execution id) among the WAL's subjects
    ended_in_wal: int  # of those, with a terminal event still in the WAL: what `history archive --now` would take
    executions_archived: int | None  # keys of hist_<n>
    proj: BucketFigures | None
    hist: BucketFigures | None
    history_segments: ObjectFigures
    snapshot_segments: ObjectFigures


class HistoryStats(msgspec.Struct, frozen=True, kw_only=True):
    """``history stats``: the object store it looked at, each shard, and the results tier if asked for."""

    objects_url: str
    shards: list[ShardStats]
    results: ObjectFigures | None = None


async def stream_info(
    js: JetStreamContext, stream: str, *, subjects_filter: str | None = None, offset: int = 0
) -> dict[str, Any]:
    """The server's raw ``STREAM.INFO`` answer; ``NotFoundError`` if there is no such stream."""
    request: dict[str, Any] = {}
    if subjects_filter is not None:
        request["subjects_filter"] = subjects_filter
    if offset:
        request["offset"] = offset
    payload = json.dumps(request).encode() if request else b""
    return await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}", payload, timeout=js._timeout)


def _figures(info: dict[str, Any]) -> StreamFigures:
    state = info.get("state") or {}
    return StreamFigures(
        messages=int(state.get("messages", 0)), bytes=int(state.get("bytes", 0)),
        subjects=int(state.get("num_subjects", 0)), first_seq=int(state.get("first_seq", 0)),
        last_seq=int(state.get("last_seq", 0)), deleted=int(state.get("num_deleted", 0)),
    )  # fmt: skip


async def stream_figures(js: JetStreamContext, stream: str) -> StreamFigures:
    return _figures(await stream_info(js, stream))


async def bucket_figures(js: JetStreamContext, bucket: str) -> BucketFigures | None:
    try:
        figures = await stream_figures(js, f"KV_{bucket}")
    except NotFoundError:
        return None
    return BucketFigures(keys=figures.subjects, bytes=figures.bytes)


async def stream_subjects(js: JetStreamContext, stream: str, subjects_filter: str) -> AsyncIterator[str]:
    """Every subject of ``stream`` matching ``subjects_filter`` that holds a message, page by page.

    The server answers at most 100,000 subjects a request (sorted once there is
    more than one page) and says how many match in all (``total``).
    """
    offset = 0
    while True:
        info = await stream_info(js, stream, subjects_filter=subjects_filter, offset=offset)
        page = (info.get("state") or {}).get("subjects") or {}
        for subject in page:
            yield subject
        offset += len(page)
        if not page or offset >= int(info.get("total", 0)):
            return


def execution_of(subject: str) -> tuple[str, str, str]:
    """(tenant, project, execution id) of a WAL event subject."""
    _, _, tenant, project, execution_id, _ = subject.split(".", 5)
    return tenant, project, execution_id


def terminal_filter(shard: int, tenant: str | None, project: str | None, event_type: str) -> str:
    return f"wal.{shard}.{tenant or '*'}.{project or '*'}.*.{event_type}"


async def ended_executions(
    js: JetStreamContext, shard: int, *, tenant: str | None = None, project: str | None = None
) -> list[tuple[str, str, str]]:
    """(tenant, project, execution id) of every execution whose terminal event is in the WAL, in id order."""
    found: set[tuple[str, str, str]] = set()
    for event_type in TERMINAL_TYPES:
        async for subject in stream_subjects(js, wal_stream(shard), terminal_filter(shard, tenant, project, event_type)):
            found.add(execution_of(subject))
    return sorted(found, key=lambda x: (int(x[2]) if x[2].isdigit() else 0, x))


async def idle_executions(
    js: JetStreamContext, shard: int, *, idle_s: float, tenant: str | None = None, project: str | None = None,
    now: float | None = None,
) -> list[tuple[str, str, str]]:
    """Executions in the WAL with no terminal event whose last event is older than ``idle_s`` seconds.

    "Last event" is the projection's ``updated_at`` (the ``ts`` of the newest event folded); an
    execution the kernel has not folded yet is not idle. In id order, like :func:`ended_executions`.
    """
    from datetime import datetime

    from projector.cache import KvProjectionCache
    from projector.errors import ProjectorError

    ended = set(await ended_executions(js, shard, tenant=tenant, project=project))
    seen: set[tuple[str, str, str]] = set()
    async for subject in stream_subjects(js, wal_stream(shard), f"wal.{shard}.{tenant or '*'}.{project or '*'}.>"):
        try:
            seen.add(execution_of(subject))
        except ValueError:
            continue  # too short to be an event's subject (poison)
    cache = await KvProjectionCache.open(js, shard)
    cutoff = (time.time() if now is None else now) - idle_s
    idle = []
    for execution in sorted(seen - ended, key=lambda x: (int(x[2]) if x[2].isdigit() else 0, x)):
        try:
            entry = await cache.get(execution[2])
        except ProjectorError:
            continue
        p = None if entry is None else entry.projection
        if p is None or (p.tenant, p.project) != execution[:2]:
            continue  # not folded (or by reference, which only a big projection is): not judged idle here
        try:
            updated = datetime.fromisoformat(p.updated_at).timestamp()
        except ValueError:
            continue
        if updated <= cutoff:
            idle.append(execution)
    return idle


def object_figures(root: ObjectRoot, *parts: str, recursive: bool = False) -> ObjectFigures:
    """The finished objects under ``<base>/<parts…>`` (a missing directory holds none)."""
    directory = root.path(*parts)
    root.fs.invalidate_cache(directory)
    try:
        if recursive:
            listing: Sequence[dict[str, Any]] = list(root.fs.find(directory, detail=True).values())
        else:
            listing = root.fs.ls(directory, detail=True)
    except FileNotFoundError:
        return ObjectFigures(objects=0, bytes=0)
    files = [f for f in listing if f.get("type") == "file" and not str(f["name"]).rsplit("/", 1)[-1].startswith(".")]
    return ObjectFigures(objects=len(files), bytes=sum(int(f.get("size") or 0) for f in files))


def shard_objects(root: ObjectRoot, shard: int) -> tuple[ObjectFigures, ObjectFigures]:
    """(history segments, snapshot segments) of ``shard``."""
    return object_figures(root, "history", f"shard={shard}"), object_figures(root, "segments", f"shard={shard}")


async def shard_stats(js: JetStreamContext, shard: int, root: ObjectRoot) -> ShardStats:
    """One shard's figures: three ``STREAM.INFO`` requests, a listing of the WAL's subjects and two of objects."""
    wal = await stream_figures(js, wal_stream(shard))
    executions: set[tuple[str, str, str]] = set()
    ended: set[tuple[str, str, str]] = set()
    async for subject in stream_subjects(js, wal_stream(shard), wal_subjects(shard)):
        try:
            execution = execution_of(subject)
        except ValueError:
            continue  # a subject too short to be an event's (poison): no execution
        executions.add(execution)
        if subject.split(".", 5)[5] in TERMINAL_TYPES:
            ended.add(execution)
    hist = await bucket_figures(js, hist_bucket(shard))
    history, snapshots = await asyncio.to_thread(shard_objects, root, shard)
    return ShardStats(
        shard=shard, wal=wal, executions_in_wal=len(executions), ended_in_wal=len(ended),
        executions_archived=None if hist is None else (await ArchiveIndex(js, shard, None).manifest(newer_than=time.monotonic())).rows,
        proj=await bucket_figures(js, proj_bucket(shard)),
        hist=hist, history_segments=history, snapshot_segments=snapshots,
    )  # fmt: skip
