"""Idempotent bootstrap of a cell's JetStream assets: WAL/CMD/DLQ streams and the KV/object buckets.

Every asset is checked first; if any existing one differs from what the
topology asks for, nothing is created or changed and the differences are
reported together (:class:`~kernel.errors.BootstrapMismatch`).

With several cells (a supercluster) every asset is created in its cell
(:mod:`natscluster.placement`), so one bootstrap through any cell's connection lays
out the whole supercluster, and an asset found in another cell is a mismatch.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from kernel.errors import BootstrapMismatch, ConfigError, TopologyMismatch
from natscluster.placement import placed, placement_cell
from locator import subjects as sub
from locator.topology import Topology

log = structlog.get_logger("noetl.kernel.bootstrap")

# Recorded on every WAL stream: a client with another shard count would route events to the wrong shard.
SHARD_COUNT_KEY = "noetl_shard_count"


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Stream limits shared by every shard; env: ``NOETL_DUPLICATE_WINDOW``, ``NOETL_MAX_MSG_SIZE``, ``NOETL_LEASE_TTL``,
    ``NOETL_IDEMPOTENCY_WINDOW`` (how long an idempotency key names its execution: the max_age of KV ``idempotency``)."""

    duplicate_window_s: float = 120.0
    max_msg_size: int = 256 * 1024
    lease_ttl_s: float = 5.0
    idempotency_window_s: float = 86400.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StreamSettings:
        env = os.environ if env is None else env
        raw = {
            "duplicate_window_s": env.get("NOETL_DUPLICATE_WINDOW"),
            "max_msg_size": env.get("NOETL_MAX_MSG_SIZE"),
            "lease_ttl_s": env.get("NOETL_LEASE_TTL"),
            "idempotency_window_s": env.get("NOETL_IDEMPOTENCY_WINDOW"),
        }
        try:
            settings = msgspec.convert({k: v for k, v in raw.items() if v}, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"bad stream setting in the environment: {e}") from e
        if settings.duplicate_window_s < 120:
            raise ConfigError("NOETL_DUPLICATE_WINDOW must be at least 120 seconds")
        if not 1024 <= settings.max_msg_size <= 8 * 1024 * 1024:
            raise ConfigError("NOETL_MAX_MSG_SIZE must be between 1024 (1 KiB) and 8388608 (8 MiB)")
        if not 1 <= settings.lease_ttl_s <= 300:
            raise ConfigError("NOETL_LEASE_TTL must be between 1 and 300 seconds")
        if not 1 <= settings.idempotency_window_s <= 366 * 86400:
            raise ConfigError("NOETL_IDEMPOTENCY_WINDOW must be between 1 second and 366 days (31622400 seconds)")
        return settings

    @property
    def server_max_payload(self) -> int:
        """The server's max_payload: room for the largest WAL message plus dead-letter headers."""
        return max(1024 * 1024, self.max_msg_size + 64 * 1024)


@dataclass
class BootstrapReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass
class _Asset:
    stream: str  # the JetStream stream behind the asset (KV_x / OBJ_x for buckets)
    expected: dict[str, Any]
    create: Callable[[JetStreamContext], Awaitable[object]]
    cell: str | None = None  # the cluster it must live in (several cells), else anywhere


def _norm(value: Any) -> Any:
    if isinstance(value, (RetentionPolicy, StorageType)):
        return value.value
    if isinstance(value, list):
        return sorted(value)
    if isinstance(value, dict):
        return {k: value.get(k) for k in sorted(value) if not k.startswith("_nats")}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _stream_asset(config: StreamConfig, cell: str | None) -> _Asset:
    expected = {
        "subjects": config.subjects,
        "retention": config.retention,
        "storage": config.storage,
        "num_replicas": config.num_replicas,
        "duplicate_window": config.duplicate_window,
        "max_msg_size": config.max_msg_size,
        "metadata": config.metadata or {},
    }

    async def create(js: JetStreamContext) -> object:
        return await js.add_stream(config)

    assert config.name is not None
    return _Asset(config.name, expected, create, cell)


def _kv_asset(config: KeyValueConfig, cell: str | None) -> _Asset:
    expected = {
        "max_msgs_per_subject": config.history,
        "max_age": config.ttl or 0,
        "storage": config.storage,
        "num_replicas": config.replicas,
    }

    async def create(js: JetStreamContext) -> object:
        return await js.create_key_value(config)

    return _Asset(f"KV_{config.bucket}", expected, create, cell)


def _obj_asset(bucket: str, config: ObjectStoreConfig, cell: str | None) -> _Asset:
    expected = {"storage": config.storage, "num_replicas": config.replicas}

    async def create(js: JetStreamContext) -> object:
        # nats-py overwrites config.bucket with the bucket argument.
        return await js.create_object_store(bucket=bucket, config=config)

    return _Asset(f"OBJ_{bucket}", expected, create, cell)


def shard_assets(
    shard: int, *, shard_count: int, replicas: int, settings: StreamSettings, cell: str | None = None
) -> list[_Asset]:
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": replicas,
        "duplicate_window": settings.duplicate_window_s,
    }
    return [
        _stream_asset(
            StreamConfig(
                name=sub.wal_stream(shard),
                description=f"write-ahead log of shard {shard}",
                subjects=[sub.wal_subjects(shard)],
                retention=RetentionPolicy.LIMITS,
                allow_direct=True,
                # Producer.publish_many's atomic batches (kernel/atomic.py). Not compared on an existing
                # stream: a WAL created before it (or on a server before 2.12) is kept, and the producer
                # publishes to it one event at a time, as it always did.
                allow_atomic=True,
                max_msg_size=settings.max_msg_size,
                metadata={SHARD_COUNT_KEY: str(shard_count)},
                **common,
            ),
            cell,
        ),
        _stream_asset(
            StreamConfig(
                name=sub.cmd_stream(shard),
                description=f"commands for data workers of shard {shard}",
                subjects=[sub.cmd_subjects(shard)],
                retention=RetentionPolicy.WORK_QUEUE,
                max_msg_size=settings.max_msg_size,
                **common,
            ),
            cell,
        ),
        _stream_asset(
            StreamConfig(
                name=sub.dlq_stream(shard),
                description=f"dead letters of shard {shard}, with reasons",
                subjects=[sub.dlq_subjects(shard)],
                retention=RetentionPolicy.LIMITS,
                # Unbounded per message (the server's max_payload still applies) so a poison
                # message at the WAL's size limit plus its reason headers is never refused.
                max_msg_size=-1,
                **common,
            ),
            cell,
        ),
        _kv_asset(
            KeyValueConfig(
                # Direct get: reads skip the JetStream API round trip's JSON/base64 (the edge's warm path).
                bucket=sub.proj_bucket(shard), history=1, storage=StorageType.FILE, replicas=replicas, direct=True
            ),
            cell,
        ),
        _kv_asset(
            # Where each execution's archived history parts are (system/cleanup writes, history readers read).
            KeyValueConfig(bucket=sub.hist_bucket(shard), history=1, storage=StorageType.FILE, replicas=replicas, direct=True),
            cell,
        ),
        _kv_asset(
            # The visibility index listings read (projector/visibility.py): system/project writes it.
            KeyValueConfig(bucket=sub.vis_bucket(shard), history=1, storage=StorageType.FILE, replicas=replicas, direct=True),
            cell,
        ),
    ]


def global_assets(*, replicas: int, settings: StreamSettings, cell: str | None = None) -> list[_Asset]:
    return [
        _kv_asset(
            KeyValueConfig(bucket=sub.CATALOG_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas), cell
        ),
        _kv_asset(
            KeyValueConfig(
                bucket=sub.LEASES_BUCKET,
                history=1,
                ttl=settings.lease_ttl_s,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
            cell,
        ),
        _obj_asset(sub.PLUGINS_BUCKET, ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas), cell),
        # Credentials (worker/keychain.py), encrypted; the history keeps a credential's last versions.
        _kv_asset(
            KeyValueConfig(bucket=sub.KEYCHAIN_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas), cell
        ),
        # Schedules (system_playbooks/schedules): definitions and each one's last handled tick, compare-and-set.
        _kv_asset(
            KeyValueConfig(bucket=sub.SCHEDULES_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas), cell
        ),
        # Idempotency keys of starts (edge/idempotency.py): max_age is the window, after which a key is forgotten.
        _kv_asset(
            KeyValueConfig(
                bucket=sub.IDEMPOTENCY_BUCKET,
                history=1,
                ttl=settings.idempotency_window_s,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
            cell,
        ),
    ]


async def bootstrap(
    js: JetStreamContext,
    topology: Topology,
    *,
    shards: Iterable[int] | None = None,
    settings: StreamSettings | None = None,
) -> BootstrapReport:
    """Create what is missing for ``shards`` (default: all) plus the global buckets; change nothing that exists."""
    settings = settings or StreamSettings()
    wanted = list(range(topology.shard_count)) if shards is None else sorted(set(shards))
    assets = global_assets(replicas=topology.replicas, settings=settings, cell=placement_cell(topology, None))
    for shard in wanted:
        assets += shard_assets(
            shard, shard_count=topology.shard_count, replicas=topology.replicas, settings=settings,
            cell=placement_cell(topology, shard),
        )

    report = BootstrapReport()
    missing: list[_Asset] = []
    problems: list[str] = []
    for asset in assets:
        try:
            info = await js.stream_info(asset.stream)
        except NotFoundError:
            missing.append(asset)
            continue
        for name, want in asset.expected.items():
            have = getattr(info.config, name)
            if _norm(have) != _norm(want):
                hint = f" (change it explicitly: `noetl-edge cluster replicas {want}`)" if name == "num_replicas" else ""
                problems.append(f"{asset.stream}.{name} is {_norm(have)!r}, topology wants {_norm(want)!r}{hint}")
        where = info.cluster.name if info.cluster else None
        if asset.cell is not None and where != asset.cell:
            # JetStream does not move a stream between clusters on an update; that is a migration, not a bootstrap.
            problems.append(f"{asset.stream} lives in cluster {where!r}, topology places it in cell {asset.cell!r}")
    if problems:
        raise BootstrapMismatch(problems)
    for asset in missing:
        await asset.create(placed(js, asset.cell))
        report.created.append(asset.stream)
        log.info("bootstrap.created", stream=asset.stream)
    report.unchanged = [a.stream for a in assets if a not in missing]
    return report


async def check_topology(js: JetStreamContext, topology: Topology, *, shard: int | None = None) -> None:
    """Raise unless ``shard``'s WAL stream exists and was bootstrapped with ``topology``'s shard count.

    Producers call this once before publishing, so a client with the wrong
    shard count fails loudly instead of filing events on the wrong shard.
    """
    shard = topology.cells[0].shards[0] if shard is None else shard
    stream = sub.wal_stream(shard)
    try:
        info = await js.stream_info(stream)
    except NotFoundError as e:
        raise TopologyMismatch(
            f"stream {stream} does not exist: bootstrap the topology first (`noetl-edge up` does it)"
        ) from e
    recorded = (info.config.metadata or {}).get(SHARD_COUNT_KEY)
    if recorded != str(topology.shard_count):
        raise TopologyMismatch(
            f"the server's WAL streams were bootstrapped for {recorded or 'an unknown number of'} shards, "
            f"this client uses {topology.shard_count}: events would land on the wrong shard "
            f"(use --shards {recorded} or the server's topology file)"
            if recorded
            else f"{stream} has no {SHARD_COUNT_KEY} metadata: it was not created by noetl-edge bootstrap"
        )
