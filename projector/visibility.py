"""The visibility index: one small summary per execution, keyed so that a tenant/project/time window is a subject filter.

KV ``vis_<shard>`` holds, for every execution the shard folded and did not
archive yet, its :class:`ExecutionSummary` under the key
``<tenant>.<project>.<YYYYMMDD>.<HH>.<execution_id>`` — day and hour (UTC) of
the time in the execution's snowflake id — and, once per tenant/project/day, a
marker ``_days.<tenant>.<project>.<YYYYMMDD>`` (the day directory a listing
walks newest first). ``system/project`` writes the summary before each
projection write; ``forget`` removes it (a purge, no tombstone) once the
execution's projection lives in a segment and its history was archived, so the
bucket holds the executions that are hot, not every execution ever run.

>>> key_of("acme", "web", "1")
'acme.web.20260101.00.1'
"""

from __future__ import annotations

import collections
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from locator.ids import EPOCH_MS, NODE_BITS, SEQ_BITS, timestamp_ms_of
from locator.subjects import vis_bucket
from projector.projection import TERMINAL, Projection

DAYS = "_days"  # the first token of a day marker; no tenant name starts with '_'
FETCH = 1000  # summaries fetched per pull request when a bucket is read


class PlaybookSummary(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    version: int | None = None


class ExecutionSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing shows of one execution (JSON in the API and in KV ``vis_<shard>``).

    ``ended_at`` is ``updated_at`` once the execution is terminal (its last event; a note published after the
    end moves it), None before. ``steps`` counts the execution's steps by status.
    """

    execution_id: str
    tenant: str
    project: str
    affinity: str
    status: str
    playbook: PlaybookSummary | None
    created_at: str
    updated_at: str
    ended_at: str | None
    steps: dict[str, int]
    last_seq: int
    event_count: int


_summary_decoder = msgspec.json.Decoder(ExecutionSummary)
_encoder = msgspec.json.Encoder(order="sorted")


def summarize(projection: Projection) -> ExecutionSummary:
    """The summary of a projection.

    >>> summarize(Projection(execution_id="7", tenant="a", project="b", status="COMPLETED", updated_at="t")).ended_at
    't'
    """
    playbook: Any = projection.playbook
    ref = None
    if isinstance(playbook, dict) and isinstance(playbook.get("path"), str):
        version = playbook.get("version")
        ref = PlaybookSummary(path=playbook["path"], version=version if isinstance(version, int) else None)
    counts = collections.Counter(step.status for step in projection.steps.values())
    return ExecutionSummary(
        execution_id=projection.execution_id, tenant=projection.tenant, project=projection.project,
        affinity=projection.affinity, status=projection.status, playbook=ref, created_at=projection.created_at,
        updated_at=projection.updated_at, ended_at=projection.updated_at if projection.status in TERMINAL else None,
        steps=dict(sorted(counts.items())), last_seq=projection.last_seq, event_count=projection.event_count,
    )  # fmt: skip


def encode_summary(summary: ExecutionSummary) -> bytes:
    return _encoder.encode(summary)


def decode_summary(data: bytes) -> ExecutionSummary:
    return _summary_decoder.decode(data)


def day_hour(execution_id: int) -> tuple[str, str]:
    """UTC day (``YYYYMMDD``) and hour (``HH``) of the time in a snowflake id (ids before 2026 count from the epoch)."""
    at = datetime.fromtimestamp(timestamp_ms_of(execution_id) / 1000, tz=UTC)
    return f"{at:%Y%m%d}", f"{at:%H}"


def id_at(ms: int) -> int:
    """The smallest snowflake id minted at Unix millisecond ``ms`` or later (0 before the snowflake epoch)."""
    return max(0, ms - EPOCH_MS) << (NODE_BITS + SEQ_BITS)


def day_start_id(day: str, hour: str = "00") -> int:
    """The smallest id whose time falls in ``day`` (from ``hour``)."""
    at = datetime.strptime(day + hour, "%Y%m%d%H").replace(tzinfo=UTC)
    return id_at(int(at.timestamp() * 1000))


def key_of(tenant: str, project: str, execution_id: str) -> str:
    day, hour = day_hour(int(execution_id))
    return f"{tenant}.{project}.{day}.{hour}.{execution_id}"


def day_marker(tenant: str, project: str, day: str) -> str:
    return f"{DAYS}.{tenant}.{project}.{day}"


def _subject(shard: int, key: str) -> str:
    return f"$KV.{vis_bucket(shard)}.{key}"


def _stream(shard: int) -> str:
    return f"KV_{vis_bucket(shard)}"


class VisibilityIndex:
    """One shard's visibility bucket: write a summary, forget one, read the day directory and a time bucket.

    Reads never leave a consumer behind: a bucket is read by one ephemeral pull consumer, deleted after.
    """

    def __init__(self, js: JetStreamContext, shard: int) -> None:
        self.js = js
        self.shard = shard
        self._kv: KeyValue | None = None
        self._marked: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(vis_bucket(self.shard))
        return self._kv

    async def put(self, summary: ExecutionSummary) -> None:
        """Write ``summary`` (and, the first time this index sees its day, the day marker)."""
        kv = await self.kv()
        day, _ = day_hour(int(summary.execution_id))
        marker = day_marker(summary.tenant, summary.project, day)
        if marker not in self._marked:
            await kv.put(marker, b"")
            self._marked[marker] = None
            while len(self._marked) > 4096:
                self._marked.popitem(last=False)
        await kv.put(key_of(summary.tenant, summary.project, summary.execution_id), encode_summary(summary))

    async def forget(self, execution_id: str) -> None:
        """Remove the summary of ``execution_id`` (whoever's it is: the key's tenant and project are wildcards).

        A purge of the key's subject: no tombstone is left, so the bucket holds hot executions only.
        """
        day, hour = day_hour(int(execution_id))
        try:
            await self.js.purge_stream(_stream(self.shard), subject=_subject(self.shard, f"*.*.{day}.{hour}.{execution_id}"))
        except NotFoundError:
            pass  # a cell bootstrapped before the index: nothing to forget

    async def days(self, tenant: str, project: str) -> list[str]:
        """The days (``YYYYMMDD``) with a summary of ``tenant/project`` written on this shard, newest first."""
        try:
            info = await self.js.stream_info(_stream(self.shard), subjects_filter=_subject(self.shard, day_marker(tenant, project, "*")))
        except NotFoundError:
            return []  # a cell bootstrapped before the index: nothing is listed from it until its kernel bootstraps it
        return sorted((s.rsplit(".", 1)[-1] for s in (info.state.subjects or {})), reverse=True)

    async def read(self, tenant: str, project: str, day: str, hour: str | None, *, at_most: int) -> list[ExecutionSummary] | None:
        """Every summary of one day (or one hour of it); None, having read nothing, if there are more than ``at_most``."""
        key = f"{tenant}.{project}.{day}." + (f"{hour}.*" if hour is not None else "*.*")
        config = ConsumerConfig(
            filter_subject=_subject(self.shard, key), deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0,
        )  # fmt: skip
        info = await self.js.add_consumer(_stream(self.shard), config)
        try:
            pending = info.num_pending or 0
            if pending > at_most:
                return None
            out: list[ExecutionSummary] = []
            if pending == 0:
                return out
            sub = await self.js.pull_subscribe_bind(consumer=info.name, stream=_stream(self.shard))
            try:
                while len(out) < pending:
                    for msg in await sub.fetch(min(FETCH, pending - len(out)), timeout=5.0):
                        if msg.data:
                            out.append(decode_summary(msg.data))
                        else:
                            pending -= 1  # an empty value is not a summary
            finally:
                await sub.unsubscribe()
            return out
        finally:
            assert info.name is not None
            try:
                await self.js.delete_consumer(_stream(self.shard), info.name)
            except Exception:  # noqa: BLE001 - gone already or NATS away: its inactivity threshold ends it
                pass
