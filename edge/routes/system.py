"""Locate, who am I, health, readiness and metrics."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import problem
from edge.openapi import AFFINITY, NAME, Media, Param, operation
from edge.responses import json_response
from edge.state import state_of
from kernel.scrub import scrub
from locator.subjects import wal_stream
from locator.topology import Location


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct):
    status: str
    cells: dict[str, bool]
    problems: list[str]


@operation(summary="where a tenant/project (and affinity) lives: shard, cell, subjects", role="read", tag="system", params=[
    Param(name="tenant", schema=NAME, description="tenant name", required=True),
    Param(name="project", schema=NAME, description="project name", required=True),
    AFFINITY,
], responses={200: Location}, nats=False)
async def locate(request: Request) -> Response:
    state = state_of(request)
    state.auth.identify(request.headers.get("authorization"))
    q = request.query_params
    location = state.topology.locate(q.get("tenant", ""), q.get("project", ""), q.get("affinity", ""))
    return json_response(location)


class WhoAmI(msgspec.Struct, kw_only=True):
    """The calling token as the console sees it: never the token itself."""

    name: str
    role: str
    tenants: list[str]
    shard_count: int


@operation(summary="the calling token's name, role and tenants, and the shard count", role="read", tag="system",
           responses={200: WhoAmI}, nats=False)
async def whoami(request: Request) -> Response:
    """The calling token's name, role and tenants (``*``: every tenant), and the shard count: what a client
    such as the console at ``/ui/`` may offer. Never the token itself."""
    state = state_of(request)
    principal = state.auth.identify(request.headers.get("authorization"))
    return json_response(WhoAmI(name=principal.name, role=principal.role, tenants=sorted(principal.tenants),
                                shard_count=state.topology.shard_count))


@operation(summary="liveness", role=None, tag="system", responses={200: Health}, nats=False)
async def healthz(request: Request) -> Response:
    return json_response(Health("ok"))


@operation(summary="readiness: every cell's WAL streams answer (a 503 problem names what does not)", role=None,
           tag="system", responses={200: Ready})
async def readyz(request: Request) -> Response:
    state = state_of(request)
    problems: list[str] = []
    for cell in state.topology.cells:
        try:
            js = await state.cells.js_for_shard(cell.shards[0])
            for shard in cell.shards:
                await js.stream_info(wal_stream(shard))
        except Exception as e:  # report every cell, whatever failed
            problems.append(f"cell {cell.name}: {getattr(e, 'detail', None) or e!r}")
    cells = state.cells.connected()
    if not problems:
        return json_response(Ready("ready", cells, []))
    # Not ready is a 503 like any other: a problem document (scrubbed: it quotes NATS errors).
    problems = scrub(problems)
    return problem(
        503, "Service Unavailable", "not ready: " + "; ".join(problems), request.url.path,
        {"Retry-After": "5"}, cells=cells, problems=problems,
    )


@operation(summary="Prometheus metrics", role=None, tag="system",
           responses={200: Media({"text/plain": {"type": "string"}})})
async def metrics(request: Request) -> Response:
    state = state_of(request)
    await state.metrics.refresh(state.cells.js_for_shard, range(state.topology.shard_count))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


routes = [
    Route("/api/v1/locate", locate, methods=["GET"]),
    Route("/api/v1/whoami", whoami, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
