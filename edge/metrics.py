"""Prometheus metrics: request counts and latency (middleware), and per-shard NATS figures at scrape time."""

from __future__ import annotations

import time

import structlog
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locator.subjects import cmd_stream, dlq_stream, wal_stream


access_log = structlog.get_logger("noetl.edge.access")


class EdgeMetrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "noetl_edge_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "noetl_edge_request_seconds", "HTTP request latency by route", ["method", "route"], registry=self.registry
        )
        self.lag = Gauge(
            "noetl_consumer_lag", "WAL messages not yet handled by a kernel consumer", ["shard", "consumer"], registry=self.registry
        )
        self.pending_commands = Gauge("noetl_pending_commands", "messages in CMD_<shard>", ["shard"], registry=self.registry)
        self.dlq = Gauge("noetl_dlq_messages", "messages in DLQ_<shard>", ["shard"], registry=self.registry)
        self.wal = Gauge("noetl_wal_last_seq", "last sequence of WAL_<shard>", ["shard"], registry=self.registry)
        self.up = Gauge("noetl_shard_reachable", "1 if the shard's cell answered this scrape", ["shard"], registry=self.registry)

    async def refresh(self, js_for_shard: object, shards: range) -> None:
        """Read the per-shard figures from NATS (a shard whose cell is down reports reachable 0)."""
        from edge.errors import EdgeError

        for shard in shards:
            label = str(shard)
            try:
                js = await js_for_shard(shard)  # type: ignore[operator]
                self.wal.labels(label).set((await js.stream_info(wal_stream(shard))).state.last_seq)
                self.pending_commands.labels(label).set((await js.stream_info(cmd_stream(shard))).state.messages)
                self.dlq.labels(label).set((await js.stream_info(dlq_stream(shard))).state.messages)
                for consumer in ("project", "materialize"):
                    try:
                        info = await js.consumer_info(wal_stream(shard), f"{consumer}_{shard}")
                    except NotFoundError:
                        continue
                    self.lag.labels(label, consumer).set((info.num_pending or 0) + (info.num_ack_pending or 0))
                self.up.labels(label).set(1)
            except (EdgeError, Exception):  # a scrape reports what it can
                self.up.labels(label).set(0)

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
