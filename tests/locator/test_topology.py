from __future__ import annotations

from pathlib import Path

import pytest

from locator import InvalidTopology, load_topology, topology_from_env
from locator.subjects import (
    execution_filter,
    ingest_subject,
    parse_wal_subject,
    wal_subject,
)
from locator.errors import InvalidSubject


def test_default_topology() -> None:
    t = topology_from_env({})
    assert t.shard_count == 4 and t.replicas == 1
    assert [c.name for c in t.cells] == ["local"]
    assert t.cells[0].shards == (0, 1, 2, 3)
    assert t.cells[0].urls == ("nats://127.0.0.1:4222",)


def test_env_shards_and_url() -> None:
    t = topology_from_env({"NOETL_SHARDS": "7", "NOETL_NATS_URL": "nats://10.0.0.1:4222"})
    assert t.shard_count == 7 and t.cells[0].urls == ("nats://10.0.0.1:4222",)
    with pytest.raises(InvalidTopology, match="NOETL_SHARDS"):
        topology_from_env({"NOETL_SHARDS": "many"})


def test_two_cells_from_file(tmp_path: Path) -> None:
    f = tmp_path / "topo.yaml"
    f.write_text(
        "shard_count: 8\nreplicas: 3\ncells:\n"
        "  - {name: east, urls: ['nats://e1:4222', 'nats://e2:4222'], shards: ['0-3']}\n"
        "  - {name: west, urls: ['nats://w1:4222'], shards: [4, '5-7']}\n"
    )
    t = load_topology(f)
    assert t.replicas == 3
    assert t.cell_for_shard(2).name == "east" and t.cell_for_shard(6).name == "west"
    loc = t.locate("acme", "web")
    assert loc.cell == t.cell_for_shard(loc.shard).name
    assert topology_from_env({"NOETL_TOPOLOGY": str(f)}) == t


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shard_count: 4\ncells: [{name: a, urls: ['nats://x:1'], shards: ['0-2']}]\n", "owned by no cell: 3"),
        (
            "shard_count: 4\ncells: [{name: a, urls: ['nats://x:1'], shards: ['0-3']}, {name: b, urls: ['nats://y:1'], shards: [3]}]\n",
            "owned by both",
        ),
        ("shard_count: 4\ncells: [{name: a, urls: ['nats://x:1'], shards: [9]}]\n", "outside 0..3"),
        ("shard_count: 4\ncells: [{name: A, urls: ['nats://x:1']}]\n", "invalid cell"),
        ("shard_count: 4\ncells: [{name: a, urls: ['http://x:1']}]\n", "not a NATS URL"),
        ("shard_count: 4\ncells: [{name: a, urls: []}]\n", "no NATS URLs"),
        ("shard_count: 0\n", "shard_count"),
        ("replicas: 2\n", "replicas"),
        ("shards: 4\n", "unknown field"),
        ("shard_count: [\n", "not valid YAML"),
    ],
)
def test_bad_topology_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "topo.yaml"
    f.write_text(text)
    with pytest.raises(InvalidTopology, match=message):
        load_topology(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidTopology, match="cannot read"):
        load_topology(tmp_path / "nope.yaml")


def test_subjects_round_trip() -> None:
    s = wal_subject(3, "acme", "web", "42", "step.exit")
    parts = parse_wal_subject(s)
    assert parts == (3, "acme", "web", "42", "step.exit")
    assert execution_filter(3, "acme", "web", "42") == "wal.3.acme.web.42.>"
    assert ingest_subject("acme", "web", "42", "user.x", affinity="eu") == "ina.acme.web.eu.42.user.x"


@pytest.mark.parametrize("subject", ["wal.x.acme.web.42.t", "cmd.1.acme.web.42.t", "wal.1.acme.web.4x2.t", "wal.1.acme.web"])
def test_bad_wal_subjects(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        parse_wal_subject(subject)
