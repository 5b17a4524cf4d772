"""Prometheus metrics: request counts and latency (middleware), and per-shard NATS figures at scrape time.

The tiers of history (see docs/history.md): the WAL's messages, bytes,
subjects and interior deletes and the KV buckets' keys and bytes come from
the server at every scrape (a ``STREAM.INFO`` per stream, no listing); the
object store's segments are listed at most once per ``objects_ttl`` (60 s)
and served from that listing in between, since a listing costs one request
per page on S3.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locator.command import TIMER_POOL
from locator.subjects import POOL_CONSUMER_PREFIX, cmd_stream, cmd_subjects, dlq_stream, hist_bucket, proj_bucket, wal_stream
from kernel.host import SYSTEM_PLUGINS, consumer_stream
from projector.archiveindex import ArchiveIndex
from projector.historystats import ObjectFigures, bucket_figures, shard_objects, stream_figures
from projector.objects import ObjectRoot


access_log = structlog.get_logger("noetl.edge.access")


class EdgeMetrics:
    """One registry per app, so several apps (tests) never share counters.

    ``objects``: the object store whose history and snapshot segments are
    counted (none: those gauges are absent), listed at most every ``objects_ttl`` seconds.
    """

    def __init__(self, *, objects: ObjectRoot | None = None, objects_ttl: float = 60.0) -> None:
        self.objects = objects
        self.objects_ttl = objects_ttl
        self._listed: dict[int, tuple[float, tuple[ObjectFigures, ObjectFigures]]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "noetl_edge_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "noetl_edge_request_seconds", "HTTP request latency by route", ["method", "route"], registry=self.registry
        )
        self.lag = Gauge(
            "noetl_consumer_lag",
            "messages not yet handled by a kernel consumer (of the WAL; materialize: of the projection bucket; "
            "orchestrate and cleanup: of the event types they read, while they keep up)",
            ["shard", "consumer"],
            registry=self.registry,
        )
        self.pending_commands = Gauge("noetl_pending_commands", "messages in CMD_<shard>", ["shard"], registry=self.registry)
        self.dlq = Gauge("noetl_dlq_messages", "messages in DLQ_<shard>", ["shard"], registry=self.registry)
        self.wal = Gauge("noetl_wal_last_seq", "last sequence of WAL_<shard>", ["shard"], registry=self.registry)
        self.up = Gauge("noetl_shard_reachable", "1 if the shard's cell answered this scrape", ["shard"], registry=self.registry)
        r = self.registry
        self.wal_messages = Gauge("noetl_wal_messages", "messages in WAL_<shard>", ["shard"], registry=r)
        self.wal_bytes = Gauge("noetl_wal_bytes", "bytes of WAL_<shard>", ["shard"], registry=r)
        self.wal_subjects = Gauge("noetl_wal_subjects", "subjects holding a message in WAL_<shard>", ["shard"], registry=r)
        self.wal_deleted = Gauge(
            "noetl_wal_deleted", "interior deletes of WAL_<shard> (e.g. archived histories purged)", ["shard"], registry=r
        )
        self.kv_keys = Gauge("noetl_kv_keys", "keys of KV proj_<shard> and hist_<shard>", ["shard", "bucket"], registry=r)
        self.kv_bytes = Gauge("noetl_kv_bytes", "bytes of KV proj_<shard> and hist_<shard>", ["shard", "bucket"], registry=r)
        self.archived = Gauge(
            "noetl_history_archived_executions", "rows of the index of archived executions (its manifest, KV hist_<shard>)",
            ["shard"], registry=r,
        )
        # Worker pools, per shard (see docs/workers.md "Pools"): from the per-subject counts of CMD_<shard>
        # (a work queue: a command stays stored until a worker acks it) and one listing of its consumers.
        self.pool_pending = Gauge(
            "noetl_pool_pending", "commands of the pool stored in CMD_<shard> and not yet done (queued or running)",
            ["shard", "pool"], registry=r,
        )
        self.pool_undelivered = Gauge(
            "noetl_pool_undelivered", "commands of the pool no worker has received yet (all of them while the pool "
            "has no consumer)", ["shard", "pool"], registry=r,
        )
        self.pool_unacked = Gauge(
            "noetl_pool_unacked", "commands of the pool a worker received and has not acked (running, or its worker "
            "died and they wait for redelivery)", ["shard", "pool"], registry=r,
        )
        self.pool_pulls = Gauge(
            "noetl_pool_pull_requests", "pull requests of the pool's workers waiting for a command (0: no worker of "
            "the pool is asking)", ["shard", "pool"], registry=r,
        )
        self._pools: dict[int, set[str]] = {}
        self.segments = Gauge(
            "noetl_segments", "objects under history/shard=<n>/ and segments/shard=<n>/ (listed at most once a minute)",
            ["shard", "tier"], registry=r,
        )
        self.segment_bytes = Gauge(
            "noetl_segment_bytes", "bytes under history/shard=<n>/ and segments/shard=<n>/ (listed at most once a minute)",
            ["shard", "tier"], registry=r,
        )

    async def refresh(self, js_for_shard: object, shards: range) -> None:
        """Read the per-shard figures from NATS (a shard whose cell is down reports reachable 0)."""
        from edge.errors import EdgeError

        for shard in shards:
            label = str(shard)
            try:
                js = await js_for_shard(shard)  # type: ignore[operator]
                wal = await stream_figures(js, wal_stream(shard))
                self.wal.labels(label).set(wal.last_seq)
                self.wal_messages.labels(label).set(wal.messages)
                self.wal_bytes.labels(label).set(wal.bytes)
                self.wal_subjects.labels(label).set(wal.subjects)
                self.wal_deleted.labels(label).set(wal.deleted)
                for name, bucket in (("proj", proj_bucket(shard)), ("hist", hist_bucket(shard))):
                    figures = await bucket_figures(js, bucket)
                    if figures is not None:
                        self.kv_keys.labels(label, name).set(figures.keys)
                        self.kv_bytes.labels(label, name).set(figures.bytes)
                        if name == "hist":
                            index = ArchiveIndex(js, shard, None)
                            self.archived.labels(label).set((await index.manifest(newer_than=time.monotonic())).rows)
                # One STREAM.INFO of CMD_<shard> for both its size and its per-subject (per-pool) counts.
                cmd = await js.stream_info(cmd_stream(shard), subjects_filter=cmd_subjects(shard))
                self.pending_commands.labels(label).set(cmd.state.messages)
                self.dlq.labels(label).set((await js.stream_info(dlq_stream(shard))).state.messages)
                await self._refresh_pools(js, shard, cmd.state.subjects or {})
                for consumer in SYSTEM_PLUGINS:  # each system plug-in's consumer is named after it
                    try:
                        info = await js.consumer_info(consumer_stream(consumer, shard), f"{consumer}_{shard}")
                    except NotFoundError:
                        continue
                    self.lag.labels(label, consumer).set((info.num_pending or 0) + (info.num_ack_pending or 0))
                self.up.labels(label).set(1)
            except (EdgeError, Exception):  # a scrape reports what it can
                self.up.labels(label).set(0)
            await self._refresh_objects(shard)

    async def _refresh_pools(self, js: JetStreamContext, shard: int, subjects: dict[str, int]) -> None:
        """The pool gauges of ``shard`` from its command subjects' counts and one listing of its consumers."""
        label = str(shard)
        stored: dict[str, int] = {}
        for subject, count in subjects.items():
            pool = subject.rpartition(".")[2]  # cmd.<shard>.<pool>
            if pool != TIMER_POOL:
                stored[pool] = count
        consumers = {
            c.name.removeprefix(POOL_CONSUMER_PREFIX): c
            for c in await js.consumers_info(cmd_stream(shard))
            if c.name is not None and c.name.startswith(POOL_CONSUMER_PREFIX)
        }
        # A pool seen before and drained since reports 0, not its last figures.
        pools = self._pools[shard] = set(stored) | set(consumers) | self._pools.get(shard, set())
        for pool in pools:
            c = consumers.get(pool)
            self.pool_pending.labels(label, pool).set(stored.get(pool, 0))
            self.pool_undelivered.labels(label, pool).set(stored.get(pool, 0) if c is None else c.num_pending or 0)
            self.pool_unacked.labels(label, pool).set(0 if c is None else c.num_ack_pending or 0)
            self.pool_pulls.labels(label, pool).set(0 if c is None else c.num_waiting or 0)

    async def _refresh_objects(self, shard: int) -> None:
        if self.objects is None:
            return
        now = time.monotonic()
        listed = self._listed.get(shard)
        if listed is None or now - listed[0] >= self.objects_ttl:
            try:
                figures = await asyncio.to_thread(shard_objects, self.objects, shard)
            except Exception:  # an object store that does not answer: the last listing stands
                return
            listed = self._listed[shard] = (now, figures)
        label = str(shard)
        for tier, f in zip(("history", "snapshot"), listed[1], strict=True):
            self.segments.labels(label, tier).set(f.objects)
            self.segment_bytes.labels(label, tier).set(f.bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts, times and access-logs every HTTP request by its route template (not the raw path).

    The access log is structlog (``http.request``) with ``execution_id`` bound when
    the route has one; headers, and so tokens, are never logged.
    """

    def __init__(self, app: ASGIApp, metrics: EdgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status[0])).inc()
            self.metrics.latency.labels(scope["method"], template).observe(elapsed)
            params = scope.get("path_params") or {}
            access_log.info(
                "http.request",
                method=scope["method"],
                route=template,
                status=status[0],
                ms=round(elapsed * 1000, 2),
                execution_id=params.get("execution_id"),
                tenant=params.get("tenant"),
            )
