"""What ``noetl-edge cluster status`` reports: nodes (from their monitoring port), stream leaders and consumer lag."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from natscluster.local import LocalCluster, monitor_json


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One node: whether it runs and answers, and whether it is the JetStream meta leader."""

    name: str
    pid: int | None
    client_url: str
    monitor_url: str
    healthy: bool
    meta_leader: bool


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One stream's leader, its followers (``name``, ``current``, ``lag``) and size."""

    name: str
    leader: str | None
    followers: list[tuple[str, bool, int]]
    messages: int
    last_seq: int


class ConsumerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One durable consumer: its leader and lag (``pending``: stored but not yet delivered)."""

    stream: str
    name: str
    leader: str | None
    pending: int
    ack_pending: int


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    nodes: list[NodeStatus]
    streams: list[StreamStatus]
    consumers: list[ConsumerStatus]


def node_statuses(cluster: LocalCluster) -> list[NodeStatus]:
    leader = cluster.meta_leader()
    running = cluster.running()
    out = []
    for spec in cluster.state.nodes:
        health = monitor_json(spec, "healthz") if running[spec.name] is not None else None
        out.append(
            NodeStatus(
                name=spec.name, pid=running[spec.name], client_url=spec.client_url, monitor_url=spec.monitor_url,
                healthy=(health or {}).get("status") == "ok", meta_leader=spec.name == leader,
            )
        )
    return out


async def stream_statuses(js: JetStreamContext) -> tuple[list[StreamStatus], list[ConsumerStatus]]:
    """Every stream of the account with its leader and followers, and every consumer's lag."""
    streams: list[StreamStatus] = []
    consumers: list[ConsumerStatus] = []
    for info in sorted(await js.streams_info(), key=lambda i: i.config.name or ""):
        name = info.config.name or ""
        cluster = info.cluster
        followers = [(p.name or "?", bool(p.current), p.lag or 0) for p in (cluster.replicas or [])] if cluster else []
        streams.append(
            StreamStatus(
                name=name, leader=cluster.leader if cluster else None, followers=followers,
                messages=info.state.messages, last_seq=info.state.last_seq,
            )
        )
        for c in sorted(await js.consumers_info(name), key=lambda c: c.name or ""):
            consumers.append(
                ConsumerStatus(
                    stream=name, name=c.name or "", leader=c.cluster.leader if c.cluster else None,
                    pending=c.num_pending or 0, ack_pending=c.num_ack_pending or 0,
                )
            )
    return streams, consumers
