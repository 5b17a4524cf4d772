"""A step's result: inline from the projection, or fetched by its ``result_ref`` from object storage."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import NotFound
from edge.openapi import AFFINITY, BINARY, Media, Param, operation
from edge.responses import json_response
from edge.routes.executions import BASE, _int_param, _names
from edge.state import state_of
from locator.names import check_execution_id, check_step
from projector.results import ResultError, ResultNotFound

ARROW_FILE = "application/vnd.apache.arrow.file"
ROWS = Param(name="rows", schema={"type": "integer", "minimum": 1, "maximum": 1000},
             description="a stored result: only its first rows (a table's rows or a JSON list's items), with rows_total")


class StepResult(msgspec.Struct, kw_only=True):
    """A step's result: ``result`` inline, or read from ``result_ref`` (a stored result as JSON rows)."""

    execution_id: str
    step: str
    status: str
    result_ref: str | None
    result: Any
    rows_total: int | None = None  # with ?rows=N, a stored result's row count (result then holds its first N rows)


@operation(summary="a step's result, also one stored by reference", role="read", params=[AFFINITY, ROWS],
           responses={200: Media({"application/json": StepResult, ARROW_FILE: BINARY})}, errors=[404])
async def get_result(request: Request) -> Response:
    """``Accept: application/vnd.apache.arrow.file`` returns a stored result's Feather bytes as they are."""
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    step = check_step(request.path_params["step"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    rows = _int_param(request, "rows", low=1, high=1000)
    projection = (await state.read.read(tenant, project, affinity, execution_id)).projection
    run = projection.steps.get(step)
    if run is None:
        raise NotFound(f"execution {execution_id} has no step {step!r}")
    if run.result_ref is None:
        return json_response(StepResult(execution_id=execution_id, step=step, status=run.status, result_ref=None,
                                        result=run.result))
    try:
        if ARROW_FILE in request.headers.get("accept", ""):
            data = await asyncio.to_thread(state.results.read_bytes, run.result_ref)
            return Response(data, media_type=ARROW_FILE)
        if rows is not None:
            value, total = await asyncio.to_thread(state.results.head, run.result_ref, rows)
            return json_response(StepResult(execution_id=execution_id, step=step, status=run.status,
                                            result_ref=run.result_ref, result=value, rows_total=total))
        value = await asyncio.to_thread(state.results.get_json, run.result_ref)
    except ResultNotFound as e:
        raise NotFound(str(e)) from e
    except ResultError as e:
        raise NotFound(f"the result of step {step!r} cannot be read: {e}") from e
    return json_response(StepResult(execution_id=execution_id, step=step, status=run.status, result_ref=run.result_ref,
                                    result=value))


routes = [Route(BASE + "/{execution_id}/steps/{step}/result", get_result, methods=["GET"])]
