"""What the app's routes share: settings, clients, the read path, auth, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from edge.auth import Authenticator
from edge.cells import CellClients
from edge.metrics import EdgeMetrics
from edge.readpath import ReadPath
from locator.ids import Snowflake
from locator.topology import Topology
from projector.results import ResultStore
from projector.snapshots import SnapshotStore


@dataclass
class EdgeState:
    topology: Topology
    cells: CellClients
    read: ReadPath
    auth: Authenticator
    snapshots: SnapshotStore
    metrics: EdgeMetrics
    ids: Snowflake
    results: ResultStore
    payload_cap: int = 64 * 1024
    max_body: int = 1024 * 1024
    sse_keepalive: float = 15.0


def state_of(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state
