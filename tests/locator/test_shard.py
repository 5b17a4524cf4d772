from __future__ import annotations

import json
from pathlib import Path

import pytest

from locator import LocatorError, fnv1a32, shard_for
from locator.errors import InvalidName

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "locator.json").read_text())


def test_vector_file_is_not_empty() -> None:
    assert len(VECTORS) >= 10


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"{v['tenant']}/{v['project']}/{v['affinity']}%{v['shard_count']}")
def test_vector(v: dict[str, object]) -> None:
    key = f"{v['tenant']}{v['project']}{v['affinity']}".encode()
    assert f"{fnv1a32(key):08x}" == v["fnv1a32"]
    assert shard_for(v["tenant"], v["project"], v["affinity"], v["shard_count"]) == v["shard"]  # type: ignore[arg-type]


def test_fnv1a32_reference_values() -> None:
    # Published FNV-1a 32 test values.
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


@pytest.mark.parametrize(
    ("field", "args"),
    [
        ("tenant", ("A", "web", "")),
        ("tenant", ("a.b", "web", "")),
        ("tenant", ("*", "web", "")),
        ("tenant", (">", "web", "")),
        ("tenant", ("", "web", "")),
        ("tenant", ("a" * 64, "web", "")),
        ("project", ("acme", "We b", "")),
        ("project", ("acme", "", "")),
        ("affinity", ("acme", "web", "eu.west")),
        ("affinity", ("acme", "web", ">")),
    ],
)
def test_invalid_names_rejected(field: str, args: tuple[str, str, str]) -> None:
    with pytest.raises(InvalidName) as e:
        shard_for(*args, 4)
    assert e.value.field == field
    assert field in str(e.value) and "must match" in str(e.value)


def test_longest_valid_name() -> None:
    assert 0 <= shard_for("a" * 63, "b" * 63, "c" * 63, 4) < 4


@pytest.mark.parametrize("count", [0, -1])
def test_bad_shard_count(count: int) -> None:
    with pytest.raises(LocatorError, match="shard_count"):
        shard_for("acme", "web", "", count)
