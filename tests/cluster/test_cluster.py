"""The cluster configs under ``nats/`` (drift guard, ``nats-server -t``) and ``noetl-edge cluster`` on real nodes.

:class:`ClusterCli` runs ``noetl-edge cluster …`` as a user would; its
fixture always stops the nodes (``cluster down``, then SIGKILL of any pid
left in ``cluster.json``), even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.bootstrap import StreamSettings, global_assets, shard_assets

from natscluster.local import STATE_FILE, LocalCluster
from kernel.connect import close, connect
from natscluster.natsbin import find_nats_server
from natscluster.natsconf import committed_configs, supercluster_topology
from locator.topology import load_topology
from tests.conftest import cli_env, cli_path, stream_messages

NATS_DIR = Path(__file__).resolve().parents[2] / "nats"


def test_committed_configs_match_the_renderer() -> None:
    files = committed_configs()
    for rel, text in files.items():
        assert (NATS_DIR / rel).read_text(encoding="utf-8") == text, f"nats/{rel} drifted: run python -m natscluster.natsconf"
    on_disk = {str(p.relative_to(NATS_DIR)) for p in NATS_DIR.rglob("*") if p.suffix in (".conf", ".yaml")}
    assert on_disk == set(files), f"files under nats/ the renderer does not write: {on_disk - set(files)}"


@pytest.mark.parametrize("rel", sorted(r for r in committed_configs() if r.endswith(".conf")))
def test_nats_server_accepts_every_committed_config(rel: str) -> None:
    proc = subprocess.run([str(find_nats_server()), "-t", "-c", str(NATS_DIR / rel)], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (NATS_DIR / rel).read_text()
    assert '"in.*.*.*.>": "wal.{{partition(4,1,2)}}' in text  # the ingest mappings are in every config


def test_supercluster_example_routes_each_shard_to_its_cell() -> None:
    topology = load_topology(NATS_DIR / "supercluster" / "topology.yaml")
    assert topology == supercluster_topology()
    assert [(c.name, c.shards) for c in topology.cells] == [("east", (0, 1)), ("west", (2, 3))]
    location = topology.locate("acme", "web")  # shard 3: the west cell
    assert (location.shard, location.cell) == (3, "west")
    east = (NATS_DIR / "supercluster" / "east-1.conf").read_text()
    assert 'name: "west", urls: ["nats://west-1:7222"' in east and 'name: "east"' in east


class ClusterCli:
    """``noetl-edge cluster ACTION --data-dir D`` in a subprocess."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = env or cli_env()

    def __call__(self, action: str, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [cli_path(), "cluster", action, "--data-dir", str(self.data_dir), *args, "--log-level", "warning"],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"cluster {action} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, *args: str) -> list[str]:
        """``cluster up``; the client URLs from its ready line."""
        out = self("up", *args).stdout.splitlines()
        assert out[-1].startswith("ready "), out
        return out[-1].split()[1].split(",")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self("status", "--json", check=False).stdout)
        return result

    def pids(self) -> dict[str, int]:
        state = LocalCluster.load_state(self.data_dir)
        return dict(state.pids) if state else {}

    def teardown(self) -> None:
        if (self.data_dir / STATE_FILE).exists():
            self("down", check=False)
            for pid in LocalCluster.existing(self.data_dir).running().values():
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster_cli(tmp_path: Path) -> Iterator[ClusterCli]:
    cli = ClusterCli(tmp_path / "cluster")
    try:
        yield cli
    finally:
        cli.teardown()


# Every stream the bootstrap of a 4-shard topology lays out (KV and object buckets are streams too).
ASSETS = 4 * len(shard_assets(0, shard_count=4, replicas=3, settings=StreamSettings())) + len(
    global_assets(replicas=3, settings=StreamSettings())
)

@pytest.mark.slow
def test_cluster_up_status_replicas_down(cluster_cli: ClusterCli) -> None:
    urls = cluster_cli.up()
    assert len(urls) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls)
    topology = load_topology(cluster_cli.data_dir / "topology.yaml")
    assert topology.replicas == 3 and list(topology.cells[0].urls) == urls
    status = cluster_cli.status()
    assert [n["healthy"] for n in status["nodes"]] == [True] * 3
    assert sum(n["meta_leader"] for n in status["nodes"]) == 1
    wal = {s["name"]: s for s in status["streams"] if s["name"].startswith("WAL_")}
    assert sorted(wal) == ["WAL_0", "WAL_1", "WAL_2", "WAL_3"]
    assert all(s["leader"] and len(s["followers"]) == 2 for s in wal.values())
    assert len(status["streams"]) == ASSETS  # 4 × (WAL, CMD, DLQ, proj KV, hist KV) + catalog, leases, keychain, plugins

    pids = cluster_cli.pids()
    assert cluster_cli.up() == urls and cluster_cli.pids() == pids  # up again: nothing restarted

    # Refused, nothing changed: another node count, an implicit replica change, a bootstrap with R1.
    bad = cluster_cli("up", "--nodes", "5", check=False)
    assert bad.returncode == 2 and "3-node cluster" in bad.stderr
    bad = cluster_cli("up", "--replicas", "1", check=False)
    assert bad.returncode == 2 and "noetl-edge cluster replicas 1" in bad.stderr
    bad = cluster_cli("bootstrap", "--nats-url", urls[0], check=False)
    assert bad.returncode == 1 and "WAL_0.num_replicas is 3, topology wants 1" in bad.stderr
    assert "`noetl-edge cluster replicas 1`" in bad.stderr
    too_many = cluster_cli("replicas", "5", check=False)
    assert too_many.returncode == 1 and "refused 5 replicas" in too_many.stderr
    assert {len(s["followers"]) for s in cluster_cli.status()["streams"]} == {2}

    # The explicit change, both ways; the local topology file follows.
    changed = cluster_cli("replicas", "1").stdout.splitlines()
    assert len(changed) == ASSETS and "WAL_0 3 -> 1" in changed
    assert {len(s["followers"]) for s in cluster_cli.status()["streams"]} == {0}
    assert load_topology(cluster_cli.data_dir / "topology.yaml").replicas == 1
    cluster_cli("bootstrap", "--nats-url", urls[0])  # R1 now matches
    cluster_cli("replicas", "3")
    assert {len(s["followers"]) for s in cluster_cli.status()["streams"]} == {2}

    assert cluster_cli("down").stdout.strip() == "stopped n1,n2,n3"
    assert all(p is None for p in LocalCluster.existing(cluster_cli.data_dir).running().values())
    down = cluster_cli("status", "--json", check=False)
    assert down.returncode == 1 and not any(n["healthy"] for n in json.loads(down.stdout)["nodes"])


async def test_one_node_cluster_runs_standalone_jetstream(cluster_cli: ClusterCli) -> None:
    [url] = cluster_cli.up("--nodes", "1")
    config = (cluster_cli.data_dir / "n1" / "nats" / "server.conf").read_text()
    assert "jetstream {" in config and "cluster {" not in config  # clustered JetStream would wait for routes
    topology = load_topology(cluster_cli.data_dir / "topology.yaml")
    assert topology.replicas == 1 and list(topology.cells[0].urls) == [url]
    status = cluster_cli.status()
    assert [(n["name"], n["healthy"], n["meta_leader"]) for n in status["nodes"]] == [("n1", True, True)]
    assets = len(status["streams"])
    assert {f"WAL_{n}" for n in range(4)} <= {s["name"] for s in status["streams"]}
    assert all(s["followers"] == [] for s in status["streams"])  # standalone: no replica groups
    assert cluster_cli("bootstrap").stdout.strip() == f"bootstrap created=0 unchanged={assets} replicas=1"

    proc = subprocess.run(
        [cli_path(), "publish", "--topology", str(cluster_cli.data_dir / "topology.yaml"), "--tenant", "acme",
         "--project", "web", "--execution-id", "7", "--type", "user.hello", "--payload", '{"n": 1}',
         "--event-id", "one-node-1", "--log-level", "warning"],
        capture_output=True, text=True, env=cluster_cli.env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ack = json.loads(proc.stdout)
    nc = await connect([url], name="pytest-one-node")
    try:
        js = nc.jetstream(timeout=10)
        assert (await js.stream_info(ack["stream"])).config.num_replicas == 1
        [(seq, subject, msg_id, data)] = await stream_messages(js, ack["stream"])
    finally:
        await close(nc)
    assert (seq, subject, msg_id) == (ack["seq"], "wal.3.acme.web.7.user.hello", "one-node-1")
    assert json.loads(data)["payload"] == {"n": 1}

    refused = cluster_cli("replicas", "3", check=False)
    assert refused.returncode == 1 and "refused 3 replicas" in refused.stderr
    assert cluster_cli("down").stdout.strip() == "stopped n1"
    assert cluster_cli.up("--nodes", "1") == [url]  # the same node again, on its port and store
    assert {s["name"]: s["messages"] for s in cluster_cli.status()["streams"]}[ack["stream"]] == 1


def test_status_and_down_without_a_cluster_say_how_to_start_one(tmp_path: Path) -> None:
    cli = ClusterCli(tmp_path / "nothing")
    for action in ("status", "down"):
        proc = cli(action, check=False)
        assert proc.returncode == 2 and "noetl-edge cluster up" in proc.stderr
