"""Listing a tenant/project's executions, newest first, in pages (``GET …/executions``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

import msgspec
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import Unprocessable
from edge.openapi import Param, operation
from edge.state import state_of
from locator.names import check_name
from projector.archiveindex import ArchiveIndex
from projector.listing import BadPageToken, Cursor, ListQuery, decode_token, encode_token, list_page
from projector.visibility import ExecutionSummary, VisibilityIndex, id_at
from system_playbooks.orchestrate.playbook import PATH_PATTERN

BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"
STATUSES = ("PENDING", "RUNNING", "WAITING", "COMPLETED", "FAILED", "CANCELLED")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_PATH = re.compile(PATH_PATTERN)
_INT64_MAX = 2**63 - 1
_encoder = msgspec.json.Encoder()


class ExecutionPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of a listing; ``next_page_token`` is None on the last page."""

    executions: list[ExecutionSummary]
    next_page_token: str | None


def _statuses(values: Sequence[str]) -> tuple[str, ...]:
    wanted = {v.strip().upper() for raw in values for v in raw.split(",") if v.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise Unprocessable(f"status {', '.join(unknown)!s} is not one of {', '.join(STATUSES)}", field="status")
    return tuple(s for s in STATUSES if s in wanted)


def time_bound(name: str, raw: str) -> int:
    """The execution id a ``since``/``until`` value stands for: a snowflake id as is, an RFC 3339 time as the first id of its millisecond."""
    if raw.isascii() and raw.isdigit():
        if len(raw) > 19 or int(raw) > _INT64_MAX:
            raise Unprocessable(f"{name} {raw!r} is larger than any execution id", field=name)
        return int(raw)
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise Unprocessable(
            f"{name} must be an RFC 3339 time with a zone (2026-12-04T18:00:00Z) or an execution id, got {raw[:64]!r}",
            field=name,
        )
    return id_at(int(at.timestamp() * 1000))


def parse_query(tenant: str, project: str, params: QueryParams) -> tuple[ListQuery, Cursor | None]:
    """The listing's filters and cursor from the query string; 422 naming the parameter for a bad one."""
    playbook = params.get("playbook") or None
    if playbook is not None and (len(playbook) > 255 or not _PATH.fullmatch(playbook)):
        raise Unprocessable(f"playbook {playbook[:64]!r} is not a playbook path (such as etl/daily)", field="playbook")
    since = time_bound("since", params["since"]) if params.get("since") else 0
    until = time_bound("until", params["until"]) if params.get("until") else 2**63
    if params.get("since") and params.get("until") and since >= until:
        raise Unprocessable("since must be before until (since is inclusive, until exclusive)", field="since")
    raw_limit = params.get("limit") or str(DEFAULT_LIMIT)
    if not (raw_limit.isascii() and raw_limit.isdigit()) or len(raw_limit) > 4 or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise Unprocessable(f"query parameter 'limit' must be an integer from 1 to {MAX_LIMIT}, got {raw_limit[:40]!r}", field="limit")
    query = ListQuery(
        tenant=tenant, project=project, statuses=_statuses(params.getlist("status")), playbook=playbook,
        since_id=since, until_id=until, limit=int(raw_limit),
    )  # fmt: skip
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
