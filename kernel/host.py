"""The plug-in host: manifests, loading, and the capability-scoped context a plug-in sees.

A plug-in never touches NATS: it gets envelopes (with their WAL sequence) and
the host capabilities its manifest grants. The WASM runtime extends this host.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import msgspec
import nats.errors
import structlog
import yaml
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kernel.errors import KernelError
from kernel.producer import Producer
from locator.subjects import CATALOG_BUCKET, cmd_subjects, execution_filter, proj_stream, wal_stream
from locator.topology import Topology
from projector.archive import ArchiveIndex, Archiver, HistoryArchive
from projector.cache import ProjectionCache
from projector.fold import WalEvent
from projector.replay import history
from projector.results import ResultStore
from projector.snapshots import SnapshotStore
from projector.visibility import VisibilityIndex

SYSTEM_PLAYBOOKS = Path(__file__).resolve().parent.parent / "system_playbooks"
CAPABILITIES = frozenset(
    {
        "projections.read",
        "projections.write",
        "snapshots.read",
        "snapshots.write",
        "events.publish",  # publish envelopes to the WAL (Nats-Msg-Id = event_id)
        "commands.publish",  # publish to this shard's command stream (cmd.<shard>.>)
        "history.read",  # read one execution's WAL history
        "catalog.read",  # read the playbook catalog bucket
        "results.write",  # store large step results in object storage
        "history.archive",  # move executions' histories from the WAL to the archive (system/cleanup)
        "visibility.write",  # write executions' summaries to the visibility index (KV vis_<shard>)
    }
)
HISTORY_LIMIT = 1_000_000


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
    # The event types the plug-in is delivered (empty: every event). While the pump keeps up its consumer
    # filters on them, so events it has no use for (its own, user.*) cost it no delivery; far behind, the pump
    # reads every event and picks them by subject (kernel.pump.Pump explains why).
    types: tuple[str, ...] = ()
    # runtime wasm: the guest source (.c/.zig, relative to the repository root) the entry's Python shell runs.
    module: str = ""
    # What the plug-in consumes: "wal", the shard's events (WalEvent); or "projections", the writes of the
    # shard's projection bucket (ProjectionWrite) — each projection as system/project stored it, the latest
    # revision of a key only (the bucket keeps one), never an event system/project has not folded yet.
    source: Literal["wal", "projections"] = "wal"

    def stream(self, shard: int) -> str:
        """The stream this plug-in's consumer reads on ``shard``."""
        return proj_stream(shard) if self.source == "projections" else wal_stream(shard)


class SentCommand(NamedTuple):
    """A command queued on the connection whose ack is not waited for yet."""

    subject: str
    data: bytes
    msg_id: str
    future: asyncio.Future[PubAck] | None


@dataclass
class ShardContext:
    """The granted capabilities of one plug-in on one shard."""

    shard: int
    plugin: str
    granted: frozenset[str]
    _cache: ProjectionCache | None = field(default=None, repr=False)
    _snapshots: SnapshotStore | None = field(default=None, repr=False)
    _js: JetStreamContext | None = field(default=None, repr=False)
    _topology: Topology | None = field(default=None, repr=False)
    duplicate_window_ms: int = 120_000
    _results: ResultStore | None = field(default=None, repr=False)
    _visibility: VisibilityIndex | None = field(default=None, repr=False)
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

    def results(self) -> ResultStore:
        self._need("results.write")
        if self._results is None:
            assert self._snapshots is not None
            self._results = ResultStore(self._snapshots.base_url, storage_options=self._snapshots.storage_options)
        return self._results

    def archiver(self) -> Archiver:
        """Moves histories from this shard's WAL to the archive in object storage."""
        self._need("history.archive")
        assert self._js is not None and self._snapshots is not None and self._topology is not None
        archive = HistoryArchive.at(self._snapshots.base_url, storage_options=self._snapshots.storage_options)
        return Archiver(self._js, shard=self.shard, shard_count=self._topology.shard_count, archive=archive)

    def archive_index(self) -> ArchiveIndex | None:
        """This shard's index of archived executions (their final projections, where their histories are).

        None for a context built without a NATS connection (a tool folding outside the kernel).
        """
        self._need("projections.read")
        if self._js is None:
            return None
        archive = self.history_archive()
        return ArchiveIndex(self._js, self.shard, archive.root if archive else None)

    def visibility(self) -> VisibilityIndex | None:
        """This shard's visibility index (None without a NATS connection, as in a fold-only test)."""
        self._need("visibility.write")
        if self._js is None:
            return None
        if self._visibility is None:
            self._visibility = VisibilityIndex(self._js, self.shard)
        return self._visibility

    def history_archive(self) -> HistoryArchive | None:
        """The archive history readers read first (None without an object store)."""
        if self._snapshots is None:
            return None
        return HistoryArchive.at(self._snapshots.base_url, storage_options=self._snapshots.storage_options)

    def producer(self) -> Producer:
        self._need("events.publish")
        assert self._js is not None and self._topology is not None
        return Producer(self._js, self._topology)

    async def publish_command(self, subject: str, data: bytes, *, msg_id: str) -> int:
        """Publish to this shard's command stream; returns the stream sequence."""
        self._need("commands.publish")
        assert self._js is not None
        if not subject.startswith(cmd_subjects(self.shard)[:-1]):
            raise PluginError(f"plug-in {self.plugin} may publish commands only to {cmd_subjects(self.shard)}")
        ack = await self._js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        return int(ack.seq)

    async def send_command(self, subject: str, data: bytes, *, msg_id: str) -> SentCommand:
        """Queue a command without waiting for its ack (ordered after what was sent before); see :meth:`confirm_command`."""
        self._need("commands.publish")
        assert self._js is not None
        if not subject.startswith(cmd_subjects(self.shard)[:-1]):
            raise PluginError(f"plug-in {self.plugin} may publish commands only to {cmd_subjects(self.shard)}")
        try:
            future = await self._js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id})
        except (nats.errors.Error, TimeoutError):
            return SentCommand(subject, data, msg_id, None)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return SentCommand(subject, data, msg_id, future)

    async def confirm_command(self, sent: SentCommand, *, timeout: float = 5.0) -> int:
        """The stream sequence of a sent command, published again (same ``Nats-Msg-Id``) if its ack does not come."""
        if sent.future is not None:
            try:
                return int((await asyncio.wait_for(sent.future, timeout)).seq)
            except (nats.errors.Error, TimeoutError):
                pass  # the server's answer went missing: the retry is deduplicated by the id
        return await self.publish_command(sent.subject, sent.data, msg_id=sent.msg_id)

    async def history(self, tenant: str, project: str, execution_id: str) -> AsyncIterator[WalEvent]:
        """The execution's events on this shard, in WAL order, up to now."""
        self._need("history.read")
        assert self._js is not None and self._topology is not None
        async for event in history(
            self._js, shard=self.shard, shard_count=self._topology.shard_count, tenant=tenant, project=project,
            execution_id=execution_id, limit=HISTORY_LIMIT, archive=self.history_archive(),
        ):
            yield event

    async def next_event_seq(
        self, tenant: str, project: str, execution_id: str, *, after_seq: int, type: str | None = None
    ) -> int | None:
        """The WAL sequence of the execution's first event (of ``type``, if given) after ``after_seq``, or None."""
        self._need("history.read")
        assert self._js is not None
        subject = execution_filter(self.shard, tenant, project, execution_id)
        if type is not None:
            subject = subject[:-1] + type
        try:
            msg = await self._js.get_msg(wal_stream(self.shard), seq=after_seq + 1, next=True, subject=subject)
        except NotFoundError:
            return None
        return msg.seq

    async def wal_last_seq(self) -> int:
        """The sequence of the newest event in this shard's WAL now (0 when it is empty)."""
        self._need("history.read")
        assert self._js is not None
        return int((await self._js.stream_info(wal_stream(self.shard))).state.last_seq)

    async def catalog_bucket(self) -> KeyValue:
        self._need("catalog.read")
        assert self._js is not None
        return await self._js.key_value(CATALOG_BUCKET)


class Plugin(Protocol):
    async def handle(self, ctx: ShardContext, events: Sequence[Any]) -> Sequence[Reject] | None:
        """Apply a batch (in stream order); return only once its effects are durable.

        ``events`` are :class:`WalEvent` for a ``source: wal`` plug-in, :class:`ProjectionWrite` for a
        ``source: projections`` one.

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
    if manifest.types and manifest.source != "wal":
        raise PluginError(f"{path}: types filter events, and source {manifest.source!r} delivers no events")
    return manifest


def consumer_stream(consumer: str, shard: int) -> str:
    """The stream a system plug-in's consumer (``project``, ``materialize``…) reads on ``shard``.

    >>> consumer_stream("project", 2), consumer_stream("materialize", 2)
    ('WAL_2', 'KV_proj_2')
    """
    manifest = _system_consumers().get(consumer)
    if manifest is None:
        raise PluginError(f"no system plug-in has the consumer {consumer!r}")
    return manifest.stream(shard)


@functools.cache
def _system_consumers() -> dict[str, Manifest]:
    return {m.consumer: m for m in system_manifests()}


SYSTEM_PLUGINS = ("project", "orchestrate", "materialize", "cleanup")  # in the order their pumps start


def system_manifests(names: Sequence[str] = SYSTEM_PLUGINS) -> list[Manifest]:
    return [load_manifest(SYSTEM_PLAYBOOKS / name / "manifest.yaml") for name in names]


def load_plugin(manifest: Manifest) -> Plugin:
    if manifest.runtime == "wasm" and not manifest.module:
        raise PluginError(f"{manifest.path}: runtime 'wasm' needs a module (the guest source the entry runs)")
    module_name, _, attr = manifest.entry.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{manifest.path}: cannot load entry {manifest.entry!r}: {e}") from e
    # A wasm plug-in's entry is its Python I/O shell; it gets the manifest to find its module.
    plugin: Plugin = factory(manifest) if manifest.runtime == "wasm" else factory()
    return plugin


def context_for(
    manifest: Manifest,
    shard: int,
    *,
    cache: ProjectionCache,
    snapshots: SnapshotStore,
    js: JetStreamContext | None = None,
    topology: Topology | None = None,
    duplicate_window_s: float = 120.0,
) -> ShardContext:
    return ShardContext(
        shard=shard,
        plugin=manifest.path,
        granted=frozenset(manifest.capabilities),
        _cache=cache,
        _snapshots=snapshots,
        _js=js,
        _topology=topology,
        duplicate_window_ms=int(duplicate_window_s * 1000),
        log=structlog.get_logger("noetl.plugin").bind(plugin=manifest.path, shard=shard),
    )
