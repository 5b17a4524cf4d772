"""Topology: cells (NATS clusters with their URLs) and the shards each owns.

A topology file is YAML (or JSON)::

    shard_count: 4
    replicas: 1
    cells:
      - name: local
        urls: ["nats://127.0.0.1:4222"]
        shards: ["0-3"]

Shard numbers are global; shard -> cell is the edge's routing table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
import yaml

from locator.errors import InvalidTopology, LocatorError
from locator.names import check_name
from locator.shard import fnv1a32, shard_for, shard_key
from locator.subjects import subject_prefix, wal_stream

DEFAULT_SHARDS = 4
DEFAULT_CELL = "local"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class Cell(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS cluster: where to connect and which shards it owns."""

    name: str
    urls: tuple[str, ...]
    shards: tuple[int, ...]


class Location(msgspec.Struct, frozen=True, kw_only=True):
    """Where ``(tenant, project, affinity)`` lives; the output of ``noetl-edge locate``."""

    tenant: str
    project: str
    affinity: str
    shard_count: int
    fnv1a32: str
    shard: int
    cell: str
    subject_prefix: str
    stream: str


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """Shard count, replica count and cells; validated on construction via :func:`make_topology`.

    >>> t = default_topology()
    >>> t.locate("acme", "web").stream
    'WAL_3'
    """

    shard_count: int
    replicas: int
    cells: tuple[Cell, ...]

    def cell_for_shard(self, shard: int) -> Cell:
        for cell in self.cells:
            if shard in cell.shards:
                return cell
        raise InvalidTopology(f"shard {shard} is owned by no cell (shard_count={self.shard_count})")

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise InvalidTopology(f"unknown cell {name!r}; cells: {[c.name for c in self.cells]}")

    def locate(self, tenant: str, project: str, affinity: str = "") -> Location:
        shard = shard_for(tenant, project, affinity, self.shard_count)
        return Location(
            tenant=tenant,
            project=project,
            affinity=affinity,
            shard_count=self.shard_count,
            fnv1a32=f"{fnv1a32(shard_key(tenant, project, affinity)):08x}",
            shard=shard,
            cell=self.cell_for_shard(shard).name,
            subject_prefix=subject_prefix(shard, tenant, project),
            stream=wal_stream(shard),
        )

    def with_urls(self, cell: str, urls: tuple[str, ...]) -> Topology:
        """A copy with ``cell``'s URLs replaced (used when the embedded server picks its port)."""
        return make_topology(
            shard_count=self.shard_count,
            replicas=self.replicas,
            cells=[msgspec.structs.replace(c, urls=urls) if c.name == cell else c for c in self.cells],
        )


class _CellFile(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    urls: list[str]
    shards: list[int | str] | None = None


class _TopologyFile(msgspec.Struct, forbid_unknown_fields=True):
    shard_count: int = DEFAULT_SHARDS
    replicas: int = 1
    cells: list[_CellFile] | None = None


def _expand_shards(spec: list[int | str], *, cell: str) -> list[int]:
    out: list[int] = []
    for item in spec:
        if isinstance(item, int):
            out.append(item)
            continue
        lo, sep, hi = item.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError as e:
            raise InvalidTopology(f"cell {cell!r}: bad shard range {item!r} (use 5 or '0-3')") from e
    return out


def make_topology(*, shard_count: int, replicas: int, cells: list[Cell]) -> Topology:
    """Build a topology, checking every shard is owned by exactly one cell."""
    if not isinstance(shard_count, int) or not 1 <= shard_count <= 65536:
        raise InvalidTopology(f"shard_count must be an integer 1..65536, got {shard_count!r}")
    if replicas not in (1, 3, 5):
        raise InvalidTopology(f"replicas must be 1, 3 or 5, got {replicas!r}")
    if not cells:
        raise InvalidTopology("a topology needs at least one cell")
    owner: dict[int, str] = {}
    for cell in cells:
        try:
            check_name("cell", cell.name)
        except LocatorError as e:
            raise InvalidTopology(str(e)) from e
        if not cell.urls:
            raise InvalidTopology(f"cell {cell.name!r} has no NATS URLs")
        for url in cell.urls:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise InvalidTopology(f"cell {cell.name!r}: {url!r} is not a NATS URL (nats://host:port)")
        for shard in cell.shards:
            if not 0 <= shard < shard_count:
                raise InvalidTopology(f"cell {cell.name!r} owns shard {shard}, outside 0..{shard_count - 1}")
            if shard in owner:
                raise InvalidTopology(f"shard {shard} is owned by both {owner[shard]!r} and {cell.name!r}")
            owner[shard] = cell.name
    missing = sorted(set(range(shard_count)) - set(owner))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise InvalidTopology(f"shards owned by no cell: {shown}")
    return Topology(shard_count=shard_count, replicas=replicas, cells=tuple(cells))


def default_topology(
    *, shard_count: int = DEFAULT_SHARDS, nats_url: str = DEFAULT_NATS_URL, replicas: int = 1
) -> Topology:
    """One cell ``local`` owning every shard, served by one (embedded) server."""
    return make_topology(
        shard_count=shard_count,
        replicas=replicas,
        cells=[Cell(name=DEFAULT_CELL, urls=(nats_url,), shards=tuple(range(shard_count)))],
    )


def parse_topology(data: object, *, source: str = "topology") -> Topology:
    """Validate a decoded YAML/JSON document into a :class:`Topology`."""
    try:
        raw = msgspec.convert(data, _TopologyFile)
    except msgspec.ValidationError as e:
        raise InvalidTopology(f"{source}: {e}") from e
    if raw.cells is None:
        return default_topology(shard_count=raw.shard_count, replicas=raw.replicas)
    cells = []
    for c in raw.cells:
        shards = _expand_shards(c.shards, cell=c.name) if c.shards is not None else []
        if c.shards is None and len(raw.cells) == 1:
            shards = list(range(raw.shard_count))
        cells.append(Cell(name=c.name, urls=tuple(c.urls), shards=tuple(sorted(shards))))
    return make_topology(shard_count=raw.shard_count, replicas=raw.replicas, cells=cells)


def load_topology(path: str | Path) -> Topology:
    """Read a topology file (YAML or JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidTopology(f"cannot read topology file {str(p)!r}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidTopology(f"{p}: not valid YAML: {e}") from e
    return parse_topology(data, source=str(p))


def topology_from_env(
    env: Mapping[str, str] | None = None, *, shards: int | None = None, nats_url: str | None = None
) -> Topology:
    """Topology from ``NOETL_TOPOLOGY`` (a file), else one cell from ``NOETL_SHARDS``/``NOETL_NATS_URL``.

    Explicit arguments win over the environment.
    """
    env = os.environ if env is None else env
    path = env.get("NOETL_TOPOLOGY")
    if path:
        return load_topology(path)
    if shards is None:
        raw = env.get("NOETL_SHARDS", "")
        try:
            shards = int(raw) if raw else DEFAULT_SHARDS
        except ValueError as e:
            raise InvalidTopology(f"NOETL_SHARDS must be an integer, got {raw!r}") from e
    url = nats_url or env.get("NOETL_NATS_URL") or DEFAULT_NATS_URL
    return default_topology(shard_count=shards, nats_url=url)
