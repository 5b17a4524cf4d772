"""The Starlette app: a thin shell over the routers, one error handler, metrics middleware."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from edge.auth import Authenticator, TokenSpec
from edge.cells import CellClients
from edge.errors import EdgeError, Unprocessable, Unavailable, handle_edge_error, handle_http_exception, handle_unexpected
from edge.metrics import EdgeMetrics, MetricsMiddleware
from edge.readpath import ReadPath
from edge.routes import control, credentials, executions, playbooks, spec, stream, system, timeline
from edge.routes import console, deadletters
from edge.routes import results as result_routes
from edge.routes import schedules as schedule_routes
from edge.routes.listing import routes as listing_routes
from edge.state import EdgeState
from kernel.bootstrap import check_topology
from kernel.errors import PublishError
from worker.keychain import KeychainError, PlatformKey
from locator.errors import LocatorError
from locator.ids import Snowflake
from locator.topology import Topology
from projector.archive import ArchiveError
from projector.mirror import MirrorSettings
from projector.objects import ObjectRoot
from projector.results import ResultStore
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.playbook import Policy

log = structlog.get_logger("noetl.edge")


async def _locator_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LocatorError)
    return await handle_edge_error(request, Unprocessable(str(exc), field=getattr(exc, "field", None)))


async def _publish_error(request: Request, exc: Exception) -> Response:
    return await handle_edge_error(request, Unavailable(str(exc), headers={"Retry-After": "2"}))


async def _archive_error(request: Request, exc: Exception) -> Response:
    # The history archive (object storage) is away or a segment is unreadable: the tier, not the request, failed.
    return await handle_edge_error(request, Unavailable(f"the history archive could not be read: {exc}", headers={"Retry-After": "5"}))


async def _keychain_error(request: Request, exc: Exception) -> Response:
    # Input is checked before the keychain is called: what is left is the store (no bucket, an unreadable entry).
    return await handle_edge_error(request, Unavailable(f"the keychain failed: {exc}"))


async def _nats_error(request: Request, exc: Exception) -> Response:
    # A NATS call that timed out or failed under any route (not only the read path) is a 503, never a 500.
    return await handle_edge_error(
        request, Unavailable(f"NATS did not answer: {str(exc) or type(exc).__name__}", headers={"Retry-After": "2"})
    )


async def check_cells(cells: CellClients) -> None:
    """Connect to every cell that answers and check its streams match the topology's shard count.

    A wrong shard count would route reads and writes to the wrong shard: the edge refuses to serve.
    """
    await cells.start()
    for cell in cells.topology.cells:
        if cells.connected()[cell.name]:
            await check_topology(await cells.js_for_shard(cell.shards[0]), cells.topology, shard=cell.shards[0])


def create_app(
    *,
    topology: Topology,
    tokens: list[TokenSpec],
    snapshots: SnapshotStore,
    payload_cap: int = 64 * 1024,
    max_body: int = 1024 * 1024,
    min_seq_wait: float = 5.0,
    replay_limit: int = 100_000,
    sse_keepalive: float = 15.0,
    policy: Policy | None = None,
    results: ResultStore | None = None,
    keychain_key: PlatformKey | None = None,
    mirror: MirrorSettings = MirrorSettings(),
) -> Starlette:
    """Build the edge for a topology; NATS connections open in the lifespan.

    >>> from locator import default_topology
    >>> app = create_app(topology=default_topology(), snapshots=SnapshotStore("file:///tmp/objects"),
    ...                  tokens=[TokenSpec(name="t", role="read", tenants=("*",), token="x")])
    >>> sorted({r.path for r in app.routes})[:3]
    ['/api/v1/callbacks/{token}', '/api/v1/dead-letters', '/api/v1/locate']

    ``policy`` is what tenants' playbooks may reach (python module prefixes, http hosts);
    the default allows neither. ``results`` holds large step results (default: beside the snapshots).
    ``keychain_key`` is the platform key the credential routes write with (without it a PUT is a 503).
    ``mirror`` bounds the warm entries held in memory (:mod:`projector.mirror`; ``max_age=0`` turns it off).
    """
    cells = CellClients(topology, mirror=mirror)
    metrics = EdgeMetrics(objects=ObjectRoot(snapshots.base_url, storage_options=snapshots.storage_options))
    state = EdgeState(
        topology=topology,
        cells=cells,
        read=ReadPath(cells, snapshots, replay_limit=replay_limit, min_seq_wait=min_seq_wait),
        auth=Authenticator(tokens),
        snapshots=snapshots,
        metrics=metrics,
        ids=Snowflake(),
        results=results or ResultStore(snapshots.base_url, storage_options=snapshots.storage_options),
        payload_cap=payload_cap,
        max_body=max_body,
        sse_keepalive=sse_keepalive,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await check_cells(cells)
        log.info("edge.started", cells=cells.connected())
        try:
            yield
        finally:
            await cells.close()

    app = Starlette(
        routes=[*executions.routes, *control.routes, *result_routes.routes, *playbooks.routes, *credentials.routes, *stream.routes, *timeline.routes, *system.routes, *spec.routes],
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
        exception_handlers={
            EdgeError: handle_edge_error,
            LocatorError: _locator_error,
            PublishError: _publish_error,
            ArchiveError: _archive_error,
            KeychainError: _keychain_error,
            nats.errors.Error: _nats_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.router.routes.extend(listing_routes)  # GET …/executions: the listing, beside POST (start) on the same path
    app.router.routes.extend([*deadletters.routes, *console.routes])  # the dead letters and the console at /ui/
    app.state.edge = state
    app.state.policy = policy if policy is not None else Policy()
    app.state.keychain_key = keychain_key
    app.router.routes.extend(schedule_routes.routes)  # schedules: create, list, show, pause, resume, delete
    return app


def app_from_env(data_dir: Path) -> Starlette:
    """The app as ``noetl-edge edge`` and ``up`` build it from the environment."""
    import os

    from edge.auth import load_tokens
    from locator.topology import topology_from_env
    from system_playbooks.orchestrate.catalog import policy_from_env

    return create_app(
        topology=topology_from_env(),
        tokens=load_tokens(data_dir=data_dir),
        snapshots=SnapshotStore.from_env(data_dir=data_dir),
        policy=policy_from_env(os.environ),
        results=ResultStore.from_env(data_dir=data_dir),
        keychain_key=keychain_key_from_env(data_dir),
        mirror=MirrorSettings.from_env(),
    )


def keychain_key_from_env(data_dir: Path) -> PlatformKey | None:
    """The platform key as ``up`` and the kernel find it, or None (the credential routes then refuse to write)."""
    try:
        return PlatformKey.from_env(data_dir=data_dir)
    except KeychainError as e:
        log.warning("edge.no_keychain_key", reason=str(e))
        return None
