"""Listing a tenant/project's executions, newest first, in pages (``GET …/executions``)."""

from __future__ import annotations

import msgspec
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import Unprocessable
from edge.listfilters import DEFAULT_LIMIT, MAX_LIMIT, STATUSES, BadFilter, build_query
from edge.openapi import Param, operation
from edge.state import state_of
from locator.names import check_name
from projector.archiveindex import ArchiveIndex
from projector.listing import BadPageToken, Cursor, ListQuery, decode_token, encode_token, list_page
from projector.visibility import ExecutionSummary, VisibilityIndex
from system_playbooks.orchestrate.playbook import PATH_PATTERN

BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"
_encoder = msgspec.json.Encoder()


class ExecutionPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of a listing; ``next_page_token`` is None on the last page."""

    executions: list[ExecutionSummary]
    next_page_token: str | None


def parse_query(tenant: str, project: str, params: QueryParams) -> tuple[ListQuery, Cursor | None]:
    """The listing's filters and cursor from the query string; 422 naming the parameter for a bad one."""
    try:
        query = build_query(
            tenant, project, statuses=params.getlist("status"), playbook=params.get("playbook") or None,
            since=params.get("since"), until=params.get("until"), limit=params.get("limit"),
        )  # fmt: skip
    except BadFilter as e:
        raise Unprocessable(str(e), field=e.field) from e
    token = params.get("page_token")
    if not token:
        return query, None
    if len(token) > 512:
        raise Unprocessable("page_token is not a token this listing issued", field="page_token")
    try:
        return query, decode_token(token, query)
    except BadPageToken as e:
        raise Unprocessable(str(e), field="page_token") from e


@operation(summary="the project's executions, newest first, filtered and paged", role="read", params=[
    Param(name="status", schema={"type": "array", "items": {"type": "string"}},
          description=f"only these statuses ({', '.join(STATUSES)}; repeated or comma-separated)"),
    Param(name="playbook", schema={"type": "string", "pattern": PATH_PATTERN, "maxLength": 255},
          description="only executions of this playbook path"),
    Param(name="since", schema={"type": "string"}, description="created at or after: RFC 3339 with a zone, or an execution id"),
    Param(name="until", schema={"type": "string"}, description="created before: RFC 3339 with a zone, or an execution id"),
    Param(name="limit", schema={"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
          description="page size"),
    Param(name="page_token", schema={"type": "string", "maxLength": 512}, description="the previous page's next_page_token"),
], responses={200: ExecutionPage})
async def list_executions(request: Request) -> Response:
    state = state_of(request)
    tenant = check_name("tenant", request.path_params["tenant"])
    project = check_name("project", request.path_params["project"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    query, cursor = parse_query(tenant, project, request.query_params)

    async def source(shard: int) -> tuple[VisibilityIndex, ArchiveIndex]:
        js = await state.cells.js_for_shard(shard)
        return VisibilityIndex(js, shard), ArchiveIndex(js, shard, state.read.archive.root)

    # Every shard: affinities spread a tenant/project over shards (the shard key includes the affinity).
    rows, after = await list_page(source, range(state.topology.shard_count), query, cursor)
    token = None if after is None else encode_token(after, query)
    # Not through the response scrub: a summary holds no workload, result or error, and the scrub would mask
    # next_page_token (its name ends in "token").
    return Response(_encoder.encode(ExecutionPage(executions=rows, next_page_token=token)), media_type="application/json")


routes = [Route(BASE, list_executions, methods=["GET"])]
