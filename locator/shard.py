"""FNV-1a 32-bit shard key: the same function nats-server's ``partition()`` mapping uses."""

from __future__ import annotations

from functools import lru_cache

from locator.errors import LocatorError
from locator.names import check_name

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """FNV-1a 32-bit hash of ``data``.

    >>> f"{fnv1a32(b'acmeweb'):08x}"
    'ace541af'
    """
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def shard_key(tenant: str, project: str, affinity: str = "") -> bytes:
    """The bytes the shard is computed from: tenant, project and affinity, plainly concatenated."""
    return (tenant + project + affinity).encode("utf-8")


@lru_cache(maxsize=65536)
def shard_for(tenant: str, project: str, affinity: str, shard_count: int) -> int:
    """The shard that owns ``(tenant, project, affinity)`` among ``shard_count`` shards.

    Names are validated first, so a bad name never produces a shard.

    >>> shard_for("acme", "web", "", 4)
    3
    """
    check_name("tenant", tenant)
    check_name("project", project)
    check_name("affinity", affinity, allow_empty=True)
    if not isinstance(shard_count, int) or shard_count < 1:
        raise LocatorError(f"shard_count must be a positive integer, got {shard_count!r}")
    return fnv1a32(shard_key(tenant, project, affinity)) % shard_count
