"""Changing the replica count of an existing deployment: the one explicit way (``noetl-edge cluster replicas N``).

:func:`kernel.bootstrap.bootstrap` never changes an existing stream; a
topology whose replica count differs from the streams' is refused with a
hint to run this. Every asset bootstrap owns (WAL/CMD/DLQ streams, the
``proj_*``, ``catalog`` and ``leases`` KV buckets, the ``plugins`` object
store) is updated in place with JetStream's own stream update: the servers
add or remove peers and catch the new ones up; nothing is copied by us.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from kernel.bootstrap import StreamSettings, global_assets, shard_assets
from kernel.errors import ConfigError, KernelError
from locator.topology import Topology

log = structlog.get_logger("noetl.natscluster.replicas")


class ReplicaChange(msgspec.Struct, frozen=True, kw_only=True):
    """One stream's replica count before and after."""

    stream: str
    before: int
    after: int


async def set_replicas(js: JetStreamContext, topology: Topology, replicas: int) -> list[ReplicaChange]:
    """Set ``replicas`` on every bootstrapped asset of ``topology``; one :class:`ReplicaChange` per stream.

    Refuses (nothing changed) when ``replicas`` is not 1, 3 or 5, when any
    asset is missing (bootstrap first), or when the cluster has fewer
    servers than ``replicas`` (the server's own error is reported).
    """
    if replicas not in (1, 3, 5):
        raise ConfigError(f"replicas must be 1, 3 or 5, got {replicas}")
    settings = StreamSettings()
    assets = global_assets(replicas=replicas, settings=settings)
    for shard in range(topology.shard_count):
        assets += shard_assets(shard, shard_count=topology.shard_count, replicas=replicas, settings=settings)
    infos = []
    for asset in assets:
        try:
            infos.append(await js.stream_info(asset.stream))
        except NotFoundError as e:
            raise ConfigError(
                f"{asset.stream} does not exist: bootstrap first (`noetl-edge cluster bootstrap`), then change replicas"
            ) from e
    changes: list[ReplicaChange] = []
    for info in infos:
        config = info.config
        before = config.num_replicas or 1
        if before != replicas:
            config.num_replicas = replicas
            try:
                await js.update_stream(config)
            except APIError as e:
                done = ", ".join(c.stream for c in changes) or "none"
                raise KernelError(
                    f"the server refused {replicas} replicas for {config.name}: {e.description} "
                    f"(already changed: {done}; run the command again once the cause is fixed)"
                ) from e
            log.info("replicas.changed", stream=config.name, before=before, after=replicas)
        assert config.name is not None
        changes.append(ReplicaChange(stream=config.name, before=before, after=replicas))
    return changes
