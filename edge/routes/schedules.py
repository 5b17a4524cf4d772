"""Schedules: create, list, show, pause, resume, delete (KV ``schedules``; the kernels fire them).

A create is validated (cron, time zone, interval, names, the playbook
registered) before anything is stored: a bad one is a 422 or a 404 naming the
field, and writes nothing. See docs/schedules.md.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import NotFound, Unavailable, Unprocessable
from edge.openapi import operation
from edge.responses import convert, json_response, read_json
from edge.routes.playbooks import Conflict, catalog_of
from edge.state import EdgeState, state_of
from locator.names import check_name
from system_playbooks.orchestrate.start import UnknownPlaybook
from system_playbooks.schedules.spec import ScheduleInvalid, ScheduleSpec
from system_playbooks.schedules.store import (
    ScheduleExists,
    ScheduleStore,
    ScheduleStoreError,
    ScheduleView,
    create_schedule,
)

BASE = "/api/v1/tenants/{tenant}/projects/{project}/schedules"


class ScheduleList(msgspec.Struct):
    schedules: list[ScheduleView]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _scope(request: Request, need: Literal["read", "write"]) -> tuple[str, str]:
    tenant = check_name("tenant", request.path_params["tenant"])
    project = check_name("project", request.path_params["project"])
    state_of(request).auth.check(request.headers.get("authorization"), tenant=tenant, need=need)
    return tenant, project


def _id(request: Request) -> str:
    return check_name("schedule id", request.path_params["schedule_id"])


async def _store(state: EdgeState) -> ScheduleStore:
    # Global, like the catalog: the first cell holds it.
    try:
        return await ScheduleStore.open(await state.cells.js_for_shard(state.topology.cells[0].shards[0]))
    except ScheduleStoreError as e:
        raise Unavailable(str(e)) from e


def _url(tenant: str, project: str, schedule_id: str) -> str:
    return BASE.format(tenant=tenant, project=project) + f"/{schedule_id}"


def _unknown(tenant: str, project: str, schedule_id: str) -> NotFound:
    return NotFound(f"no schedule {schedule_id!r} in {tenant}/{project}")


@operation(summary="create a schedule (validated; its playbook must be registered)", role="write", tag="schedules",
           body=ScheduleSpec, responses={201: ScheduleView}, errors=[404, 409],
           headers={201: {"Location": "the schedule's URL"}})
async def create(request: Request) -> Response:
    state = state_of(request)
    tenant, project = _scope(request, "write")
    body = await read_json(request, max_bytes=state.max_body)
    spec = convert({} if body is None else body, ScheduleSpec, what="schedule")
    store = await _store(state)
    try:
        schedule = await create_schedule(store, await catalog_of(state), spec, tenant=tenant, project=project, now_ms=_now_ms())
    except ScheduleInvalid as e:
        raise Unprocessable(f"invalid schedule: {e}", field=e.field) from e
    except UnknownPlaybook as e:
        raise NotFound(str(e), field=e.field) from e
    except ScheduleExists as e:
        raise Conflict(str(e), field="id") from e
    view = await store.view(schedule, now_ms=_now_ms())
    return json_response(view, status=201, headers={"Location": _url(tenant, project, schedule.id)})


@operation(summary="the project's schedules, with their next and last tick", role="read", tag="schedules",
           responses={200: ScheduleList})
async def list_schedules(request: Request) -> Response:
    tenant, project = _scope(request, "read")
    store = await _store(state_of(request))
    now = _now_ms()
    return json_response(ScheduleList([await store.view(s, now_ms=now) for s in await store.list(tenant, project)]))


@operation(summary="one schedule: definition, next tick, last tick, last execution", role="read", tag="schedules",
           responses={200: ScheduleView}, errors=[404])
async def show(request: Request) -> Response:
    tenant, project = _scope(request, "read")
    schedule_id = _id(request)
    store = await _store(state_of(request))
    found = await store.get(tenant, project, schedule_id)
    if found is None:
        raise _unknown(tenant, project, schedule_id)
    return json_response(await store.view(found[0], now_ms=_now_ms()))


async def _set_paused(request: Request, *, paused: bool) -> Response:
    tenant, project = _scope(request, "write")
    schedule_id = _id(request)
    store = await _store(state_of(request))
    schedule = await store.set_paused(tenant, project, schedule_id, paused=paused, now_ms=_now_ms())
    if schedule is None:
        raise _unknown(tenant, project, schedule_id)
    return json_response(await store.view(schedule, now_ms=_now_ms()))


@operation(summary="pause a schedule (no tick fires until resume)", role="write", tag="schedules",
           responses={200: ScheduleView}, errors=[404])
async def pause(request: Request) -> Response:
    return await _set_paused(request, paused=True)


@operation(summary="resume a schedule from its next tick (the paused ticks are not caught up)", role="write",
           tag="schedules", responses={200: ScheduleView}, errors=[404])
async def resume(request: Request) -> Response:
    return await _set_paused(request, paused=False)


@operation(summary="delete a schedule and its progress", role="write", tag="schedules", responses={204: None}, errors=[404])
async def delete(request: Request) -> Response:
    tenant, project = _scope(request, "write")
    schedule_id = _id(request)
    if not await (await _store(state_of(request))).delete(tenant, project, schedule_id):
        raise _unknown(tenant, project, schedule_id)
    return Response(status_code=204)


routes = [
    Route(BASE, create, methods=["POST"]),
    Route(BASE, list_schedules, methods=["GET"]),
    Route(BASE + "/{schedule_id}", show, methods=["GET"]),
    Route(BASE + "/{schedule_id}", delete, methods=["DELETE"]),
    Route(BASE + "/{schedule_id}/pause", pause, methods=["POST"]),
    Route(BASE + "/{schedule_id}/resume", resume, methods=["POST"]),
]
