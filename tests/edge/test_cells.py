"""The edge's per-cell clients keep what a route opens on a connection (KV handles) for as long as that connection."""

from __future__ import annotations

from nats.js import JetStreamContext

from edge.cells import CellClients
from natscluster.server import EmbeddedServer


async def test_held_opens_once_per_connection_and_keep_false_opens_every_time(nats_server: EmbeddedServer) -> None:
    cells = CellClients(nats_server.topology.with_urls("local", (nats_server.url,)))
    opened: list[JetStreamContext] = []

    async def open_(js: JetStreamContext) -> object:
        opened.append(js)
        return object()

    try:
        first = await cells.held(0, "x", open_)
        assert await cells.held(0, "x", open_) is first and len(opened) == 1
        assert await cells.held(1, "x", open_) is not first and len(opened) == 2  # per shard
        refused = [await cells.held(0, "y", open_, keep=lambda _: False) for _ in range(2)]
        assert refused[0] is not refused[1] and len(opened) == 4
        # A new connection (the old one closed) opens again.
        await cells.close()
        again = await cells.held(0, "x", open_)
        assert again is not first and len(opened) == 5
    finally:
        await cells.close()
