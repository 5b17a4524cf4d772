"""``GET …/executions/{id}/timeline``: the execution's history as timeline rows, paged.

The edge twin of ``noetl-edge replay --json``: the rows are
:class:`projector.timeline.TimelineRow`, built by :func:`projector.timeline.timeline`
from the WAL history (``projector.replay.history``, poison skipped). ``dt_ms`` is
always the time since the execution's previous event in WAL order, so a row has the
same ``dt_ms`` on every page and under a ``step`` filter. Payloads are scrubbed
before the one-line summary is made, so a summary cut short cannot show the start
of a secret that the response scrub would no longer recognise.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import Unavailable, unknown_execution
from edge.openapi import AFFINITY, AFTER_SEQ, LIMIT, Param, operation
from edge.responses import json_response
from edge.routes.executions import BASE, _int_param, _names, _paging
from edge.state import state_of
from kernel.scrub import scrub_envelope
from locator.envelope import Envelope, EnvelopeError, decode_wal_message
from locator.names import STEP_PATTERN, check_execution_id, check_step
from locator.shard import shard_for
from locator.subjects import wal_stream
from projector.archive import HistoryArchive
from projector.errors import ProjectorError
from projector.fold import WalEvent
from projector.replay import history
from projector.timeline import TimelineRow, timeline

tracer = trace.get_tracer("noetl.edge.read")
UNBOUNDED = 2**62  # the history's size is not the bound: a page stops after ``scan`` events (below)


class TimelinePage(msgspec.Struct):
    rows: list[TimelineRow]
    next_after_seq: int | None


@dataclass(frozen=True)
class _Execution:
    js: JetStreamContext
    shard: int
    shard_count: int
    tenant: str
    project: str
    execution_id: str
    archive: HistoryArchive

    def history(self, *, after_seq: int = 0, until_seq: int | None = None) -> AsyncGenerator[WalEvent, None]:
        return history(
            self.js, shard=self.shard, shard_count=self.shard_count, tenant=self.tenant, project=self.project,
            execution_id=self.execution_id, after_seq=after_seq, until_seq=until_seq, limit=UNBOUNDED,
            archive=self.archive,
        )

    def owns(self, env: Envelope) -> bool:
        return (env.tenant, env.project, env.execution_id) == (self.tenant, self.project, self.execution_id)


async def _ts_at_or_before(ex: _Execution, seq: int, scan: int) -> str | None:
    """The ``ts`` of the execution's last event with a WAL sequence ``<= seq`` (None if there is none).

    One direct get when ``seq`` is the execution's own event (what ``next_after_seq`` always is);
    otherwise the execution's history up to ``seq`` is read, at most ``scan`` events of it (past
    that, None: the first row's ``dt_ms`` is then unknown rather than the request unbounded).
    """
    with contextlib.suppress(NotFoundError, EnvelopeError):
        msg = await ex.js.get_msg(wal_stream(ex.shard), seq=seq)
        env = decode_wal_message(msg.subject or "", msg.data or b"", shard_count=ex.shard_count)
        if ex.owns(env):
            return env.ts
    last: str | None = None
    read = 0
    events = ex.history(until_seq=seq)
    async with contextlib.aclosing(events):
        async for event in events:
            read += 1
            if read > scan:
                return None
            last = event.env.ts
    return last


async def page(
    ex: _Execution, *, after_seq: int, limit: int, until_seq: int | None, step: str | None, scan: int = UNBOUNDED
) -> tuple[list[TimelineRow], int, int | None]:
    """Up to ``limit`` rows (of ``step`` only, if given) after ``after_seq``; how many events were read;
    and, if the page stopped after ``scan`` events without filling up, the seq to go on after."""
    rows: list[TimelineRow] = []
    previous: str | None = None
    read, previous_seq = 0, after_seq
    events = ex.history(after_seq=after_seq, until_seq=until_seq)
    async with contextlib.aclosing(events):
        async for seq, env in events:
            if read == 0 and after_seq > 0:
                previous = await _ts_at_or_before(ex, after_seq, scan)
            if read >= scan:
                return rows, read, previous_seq  # not full (a full page stopped below): go on after the scan
            previous_seq = seq
            read += 1
            if step is None or env.step == step:
                rows.extend(timeline([WalEvent(seq, scrub_envelope(env))], previous_ts=previous))
                if len(rows) >= limit:
                    break
            previous = env.ts  # decoded envelopes always carry an ISO 8601 ts with a zone
    return rows, read, None


@operation(summary="a page of the history as timeline rows", role="read", params=[
    AFFINITY, AFTER_SEQ, LIMIT,
    Param(name="until_seq", schema={"type": "integer", "minimum": 1, "maximum": 2**63 - 1}, description="stop at this seq"),
    Param(name="step", schema={"type": "string", "pattern": STEP_PATTERN}, description="only this step's events"),
], responses={200: TimelinePage}, errors=[404])
async def get_timeline(request: Request) -> Response:
    state = state_of(request)
    tenant, project, affinity = _names(request)
    execution_id = check_execution_id(request.path_params["execution_id"])
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    after_seq, limit = _paging(request)
    until_seq = _int_param(request, "until_seq", low=max(after_seq, 1))
    raw_step = request.query_params.get("step")
    step = None if raw_step is None else check_step(raw_step)
    shard = shard_for(tenant, project, affinity, state.topology.shard_count)
    ex = _Execution(await state.cells.js_for_shard(shard), shard, state.topology.shard_count, tenant, project, execution_id,
                    state.read.archive)
    attributes: dict[str, str | int] = {"noetl.execution_id": execution_id, "noetl.shard": shard}
    with tracer.start_as_current_span("edge.read.timeline", attributes=attributes) as span:
        try:
            rows, read, cursor = await page(ex, after_seq=after_seq, limit=limit, until_seq=until_seq, step=step,
                                            scan=state.read.replay_limit)
        except ProjectorError as e:  # the WAL stopped delivering mid-read
            raise Unavailable(str(e), headers={"Retry-After": "2"}) from e
        span.set_attribute("noetl.rows", len(rows))
    if read == 0 and not await state.read.exists(shard, tenant, project, execution_id):
        raise unknown_execution(execution_id, tenant, project, affinity)
    # A full page, or a page that stopped at the scan bound (a rare step, a long history): go on after it.
    next_after = rows[-1].seq if len(rows) == limit else cursor
    return json_response(TimelinePage(rows, next_after))


routes = [Route(BASE + "/{execution_id}/timeline", get_timeline, methods=["GET"])]
