"""The plug-in host: manifests, loading, and the capability-scoped context a plug-in sees.

A plug-in never touches NATS: it gets envelopes (with their WAL sequence) and
the host capabilities its manifest grants. The WASM runtime extends this host.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import msgspec
import structlog
import yaml

from kernel.errors import KernelError
from projector.cache import ProjectionCache
from projector.fold import WalEvent
from projector.snapshots import SnapshotStore

SYSTEM_PLAYBOOKS = Path(__file__).resolve().parent.parent / "system_playbooks"
CAPABILITIES = frozenset({"projections.read", "projections.write", "snapshots.read", "snapshots.write"})


class PluginError(KernelError):
    """A plug-in could not be loaded, or used a capability it was not granted."""


class Reject(NamedTuple):
    """An event a plug-in refuses for good (it is dead-lettered with ``reason``; the shard goes on)."""

    seq: int
    reason: str
    detail: str


class Retry(Exception):
    """Raised by a plug-in when the batch cannot be handled yet; the pump redelivers it after ``delay``."""

    def __init__(self, reason: str, *, delay: float = 1.0) -> None:
        super().__init__(reason)
        self.delay = delay


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a plug-in is, how it runs and what it may touch."""

    path: str
    version: int
    runtime: Literal["python", "wasm"]
    entry: str
    consumer: str
    capabilities: tuple[str, ...] = ()
    max_batch: int = 1000
    linger_s: float = 0.0


@dataclass
class ShardContext:
    """The granted capabilities of one plug-in on one shard."""

    shard: int
    plugin: str
    granted: frozenset[str]
    _cache: ProjectionCache | None = field(default=None, repr=False)
    _snapshots: SnapshotStore | None = field(default=None, repr=False)
    log: structlog.typing.FilteringBoundLogger = field(default_factory=lambda: structlog.get_logger("noetl.plugin"))

    def _need(self, capability: str) -> None:
        if capability not in self.granted:
            raise PluginError(f"plug-in {self.plugin} was not granted {capability!r}")

    def cache(self, *, write: bool = False) -> ProjectionCache:
        self._need("projections.write" if write else "projections.read")
        assert self._cache is not None
        return self._cache

    def snapshots(self, *, write: bool = False) -> SnapshotStore:
        self._need("snapshots.write" if write else "snapshots.read")
        assert self._snapshots is not None
        return self._snapshots


class Plugin(Protocol):
    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> Sequence[Reject] | None:
        """Apply a batch (in WAL order); return only once its effects are durable.

        Raise to have the batch delivered again (``Retry`` for "not yet");
        return the events refused for good, which the pump dead-letters.
        """


def load_manifest(path: Path) -> Manifest:
    try:
        manifest = msgspec.convert(yaml.safe_load(path.read_text(encoding="utf-8")), Manifest)
    except (OSError, yaml.YAMLError, msgspec.ValidationError) as e:
        raise PluginError(f"bad plug-in manifest {path}: {e}") from e
    unknown = set(manifest.capabilities) - CAPABILITIES
    if unknown:
        raise PluginError(f"{path}: unknown capabilities {sorted(unknown)} (known: {sorted(CAPABILITIES)})")
    return manifest


def system_manifests(names: Sequence[str] = ("project", "materialize")) -> list[Manifest]:
    return [load_manifest(SYSTEM_PLAYBOOKS / name / "manifest.yaml") for name in names]


def load_plugin(manifest: Manifest) -> Plugin:
    if manifest.runtime != "python":
        raise PluginError(f"{manifest.path}: runtime {manifest.runtime!r} is not available in this host yet")
    module_name, _, attr = manifest.entry.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{manifest.path}: cannot load entry {manifest.entry!r}: {e}") from e
    plugin: Plugin = factory()
    return plugin


def context_for(manifest: Manifest, shard: int, *, cache: ProjectionCache, snapshots: SnapshotStore) -> ShardContext:
    return ShardContext(
        shard=shard,
        plugin=manifest.path,
        granted=frozenset(manifest.capabilities),
        _cache=cache,
        _snapshots=snapshots,
        log=structlog.get_logger("noetl.plugin").bind(plugin=manifest.path, shard=shard),
    )
