"""A local N-node nats-server cluster (``noetl-edge cluster up|status|down``), no docker.

Each node is an :class:`~natscluster.server.EmbeddedServer` with a ``cluster``
block, rendered by :func:`natscluster.natsconf.render_server_config` — the code
that renders the committed ``nats/cluster/*.conf`` — on ``127.0.0.1`` ports.
A one-node cluster has no ``cluster`` block: nats-server's clustered
JetStream needs routes to other servers and would wait for them forever, so
the one node runs JetStream standalone (its streams have one replica).
Nodes outlive the command that started them (own session, no parent-death
signal). What ``up`` started is recorded in ``<data-dir>/cluster.json`` (node
names, ports, pids); ``down`` and ``status`` read it, and ``up`` on the same
directory restarts only the nodes that are not running, on the same ports and
stores. A pid is only signalled while ``/proc/<pid>/cmdline`` still names that
node's config file, so a recycled pid is never touched.

``<data-dir>/topology.yaml`` is the cluster's topology (one cell ``local``,
every node's URL, the replica count) for ``noetl-edge kernel|edge|worker
--topology``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import structlog
import yaml

from kernel.errors import ConfigError, KernelError, ServerStartError
from natscluster.natsconf import NodeSpec, render_server_config
from natscluster.server import EmbeddedServer, free_port
from locator.topology import DEFAULT_CELL, Topology, default_topology, make_topology

log = structlog.get_logger("noetl.natscluster.local")

CLUSTER_NAME = "noetl-local"
STATE_FILE = "cluster.json"
TOPOLOGY_FILE = "topology.yaml"


class ClusterState(msgspec.Struct, kw_only=True):
    """``<data-dir>/cluster.json``: the nodes ``up`` started, and their last pids."""

    cluster: str
    shard_count: int
    replicas: int
    nodes: list[NodeSpec]
    pids: dict[str, int] = msgspec.field(default_factory=dict)


class ClusterNode(EmbeddedServer):
    """One node: an embedded server whose config joins the cluster over every node's route."""

    def __init__(self, spec: NodeSpec, *, cluster: str, routes: list[str], data_dir: Path, topology: Topology,
                 max_payload: int) -> None:  # fmt: skip
        super().__init__(
            data_dir=data_dir, topology=topology, host=spec.host, port=spec.port, monitor_port=spec.monitor_port,
            server_name=spec.name, max_payload=max_payload,
        )
        self.spec = spec
        self.cluster = cluster
        self.routes = routes
        self.die_with_parent = False

    @property
    def standalone(self) -> bool:
        """The only node: no other server to route to, so no ``cluster`` block."""
        return self.routes == [self.spec.route_url]

    def render_config(self) -> str:
        clustered = not self.standalone
        return render_server_config(
            topology=self.topology, server_name=self.spec.name, host=self.spec.bind, port=self.port,
            monitor_port=self.monitor_port, store_dir=self.data_dir / "jetstream", max_payload=self.max_payload,
            cluster_name=self.cluster if clustered else None,
            cluster_port=self.spec.cluster_port if clustered else None,
            routes=self.routes if clustered else (),
        )


def _alive(pid: int, config: Path) -> bool:
    """``pid`` runs and is the nats-server of ``config`` (not a zombie, not a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and str(config).encode() in cmdline


def monitor_json(spec: NodeSpec, path: str, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET ``http://<node monitor>/<path>`` as JSON, or ``None`` when the node does not answer."""
    try:
        with urllib.request.urlopen(f"{spec.monitor_url}/{path}", timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class LocalCluster:
    """The nodes of ``<data_dir>/cluster.json`` (or a new layout of ``nodes`` servers on free ports).

    >>> import tempfile
    >>> c = LocalCluster(tempfile.mkdtemp(), nodes=3)
    >>> [n.name for n in c.state.nodes], c.state.replicas
    (['n1', 'n2', 'n3'], 3)
    """

    def __init__(
        self, data_dir: str | Path, *, nodes: int = 3, shard_count: int = 4, replicas: int | None = None,
        host: str = "127.0.0.1", max_payload: int = 1024 * 1024,
    ) -> None:  # fmt: skip
        self.data_dir = Path(data_dir)
        self.max_payload = max_payload
        existing = self.load_state(self.data_dir)
        if existing is not None:
            if len(existing.nodes) != nodes:
                raise ConfigError(
                    f"{self.data_dir} holds a {len(existing.nodes)}-node cluster; it cannot become {nodes} nodes "
                    f"(use --nodes {len(existing.nodes)}, or a new --data-dir)"
                )
            if existing.shard_count != shard_count:
                raise ConfigError(
                    f"{self.data_dir} was bootstrapped with {existing.shard_count} shards, not {shard_count} "
                    f"(use --shards {existing.shard_count}, or a new --data-dir)"
                )
            self.state = existing
            return
        if nodes < 1 or nodes > 9:
            raise ConfigError(f"--nodes must be 1..9, got {nodes}")
        replicas = replicas if replicas is not None else (3 if nodes >= 3 else 1)
        if replicas > nodes:
            raise ConfigError(f"{replicas} replicas need at least {replicas} nodes, the cluster has {nodes}")
        specs = [
            NodeSpec(
                name=f"n{i}", host=host, bind=host, port=free_port(host), monitor_port=free_port(host),
                cluster_port=free_port(host), store_dir=str(self.data_dir / f"n{i}" / "jetstream"),
            )
            for i in range(1, nodes + 1)
        ]
        self.state = ClusterState(cluster=CLUSTER_NAME, shard_count=shard_count, replicas=replicas, nodes=specs)

    @staticmethod
    def load_state(data_dir: Path) -> ClusterState | None:
        path = data_dir / STATE_FILE
        if not path.exists():
            return None
        try:
            return msgspec.json.decode(path.read_bytes(), type=ClusterState)
        except msgspec.DecodeError as e:
            raise ConfigError(f"{path} is not a cluster state file ({e}); remove it or use another --data-dir") from e

    @classmethod
    def existing(cls, data_dir: str | Path) -> LocalCluster:
        """The cluster ``up`` recorded in ``data_dir``, or :class:`ConfigError` saying there is none."""
        state = cls.load_state(Path(data_dir))
        if state is None:
            raise ConfigError(f"no cluster in {data_dir} (no {STATE_FILE}): start one with `noetl-edge cluster up`")
        return cls(data_dir, nodes=len(state.nodes), shard_count=state.shard_count)

    @property
    def topology(self) -> Topology:
        urls = tuple(n.client_url for n in self.state.nodes)
        base = default_topology(shard_count=self.state.shard_count, replicas=self.state.replicas)
        return make_topology(
            shard_count=base.shard_count, replicas=base.replicas,
            cells=[msgspec.structs.replace(base.cells[0], urls=urls)],
        )

    @property
    def urls(self) -> list[str]:
        return [n.client_url for n in self.state.nodes]

    def node(self, name: str) -> ClusterNode:
        for spec in self.state.nodes:
            if spec.name == name:
                return ClusterNode(
                    spec, cluster=self.state.cluster, routes=[n.route_url for n in self.state.nodes],
                    data_dir=self.data_dir / spec.name, topology=self.topology, max_payload=self.max_payload,
                )
        raise ConfigError(f"no node {name!r} in {self.data_dir}; nodes: {[n.name for n in self.state.nodes]}")

    def running(self) -> dict[str, int | None]:
        """Node name -> pid if it runs, else ``None``."""
        out: dict[str, int | None] = {}
        for spec in self.state.nodes:
            pid = self.state.pids.get(spec.name)
            out[spec.name] = pid if pid is not None and _alive(pid, self.node(spec.name).config_path) else None
        return out

    def save(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / STATE_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(self.state)) + b"\n")
        t = self.topology
        doc = {"shard_count": t.shard_count, "replicas": t.replicas,
               "cells": [{"name": DEFAULT_CELL, "urls": list(t.cells[0].urls), "shards": list(t.cells[0].shards)}]}
        (self.data_dir / TOPOLOGY_FILE).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")

    def start(self, *, timeout: float = 30.0) -> list[str]:
        """Start every node that is not running; the names started. Waits for each ``/healthz``."""
        started: list[str] = []
        for name, pid in self.running().items():
            if pid is not None:
                continue
            node = self.node(name)
            try:
                node.start(timeout=timeout)
            finally:
                if node.process is not None:
                    self.state.pids[name] = node.process.pid
                    self.save()
            started.append(name)
        return started

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as any running node reports it, once it has a quorum.

        A one-node cluster runs JetStream standalone (no meta group): its node
        is the leader once its ``/jsz`` shows JetStream enabled.
        """
        for spec in self.state.nodes:
            jsz = monitor_json(spec, "jsz")
            if jsz is None:
                continue
            if len(self.state.nodes) == 1:
                return spec.name if not jsz.get("disabled") and jsz.get("config") else None
            meta = jsz.get("meta_cluster") or {}
            if meta.get("leader"):
                return str(meta["leader"])
        return None

    def wait_meta_leader(self, *, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader:
                return leader
            time.sleep(0.1)
        raise ServerStartError(f"no JetStream meta leader within {timeout:.0f}s (see {self.data_dir}/n*/nats/server.log)")

    def signal_node(self, name: str, sig: signal.Signals) -> int | None:
        """Send ``sig`` to a running node; its pid, or ``None`` if it was not running."""
        pid = self.running()[name]
        if pid is not None:
            os.kill(pid, sig)
        return pid

    def wait_stopped(self, name: str, *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running()[name] is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, *, timeout: float = 15.0) -> list[str]:
        """SIGTERM every running node, SIGKILL after ``timeout``; the names stopped."""
        stopped = [name for name in self.running() if self.signal_node(name, signal.SIGTERM) is not None]
        for name in stopped:
            if not self.wait_stopped(name, timeout=timeout):
                log.warning("cluster.kill", node=name, reason=f"no exit {timeout}s after SIGTERM")
                self.signal_node(name, signal.SIGKILL)
                if not self.wait_stopped(name, timeout=10):
                    raise KernelError(f"node {name} (pid {self.state.pids.get(name)}) did not exit after SIGKILL")
        self.state.pids.clear()
        if (self.data_dir / STATE_FILE).exists():
            self.save()
        return stopped
