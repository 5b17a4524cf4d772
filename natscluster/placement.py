"""Where bootstrap places JetStream assets in a supercluster of cells (JetStream placement by cluster).

A cell is one NATS cluster whose name is the cell's name. With several cells
a shard's streams and projection bucket go to the cell owning the shard, the
global buckets (catalog, leases, plugins) to the topology's first cell. With
one cell nothing is placed: the single server or cluster takes everything,
whatever its cluster is called.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from nats.js.api import Placement, StreamConfig, StreamInfo

from locator.topology import Topology


def placement_cell(topology: Topology, shard: int | None) -> str | None:
    """The cluster a shard's assets (``shard=None``: the global buckets) are placed in; ``None`` for one cell.

    >>> from locator.topology import Cell, default_topology, make_topology
    >>> t = make_topology(shard_count=4, replicas=1, cells=[
    ...     Cell(name="east", urls=("nats://e:4222",), shards=(0, 1)),
    ...     Cell(name="west", urls=("nats://w:4222",), shards=(2, 3))])
    >>> placement_cell(t, 3), placement_cell(t, None), placement_cell(default_topology(), 3)
    ('west', 'east', None)
    """
    if len(topology.cells) == 1:
        return None
    return topology.cells[0].name if shard is None else topology.cell_for_shard(shard).name


class PlacedJetStream(JetStreamContext):
    """A JetStream context on the same connection whose every new stream is placed in cluster ``cell``.

    Buckets are streams too, but nats-py 2.16's ``create_key_value`` drops
    ``KeyValueConfig.placement`` when it builds the bucket's stream; creating
    through this context places streams, KV buckets and object stores alike.

    >>> # kv = await PlacedJetStream(js, "west").create_key_value(KeyValueConfig(bucket="proj_2"))
    """

    def __init__(self, js: JetStreamContext, cell: str) -> None:
        super().__init__(js._nc, prefix=js._prefix, timeout=js._timeout)
        self.cell = cell

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        return await super().add_stream(config, **{**params, "placement": Placement(cluster=self.cell)})


def placed(js: JetStreamContext, cell: str | None) -> JetStreamContext:
    """``js`` itself for ``cell=None`` (one cell), else a context placing what it creates in ``cell``."""
    return js if cell is None else PlacedJetStream(js, cell)
