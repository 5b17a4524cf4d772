"""``GET …/executions/{id}/timeline`` through httpx's ASGI transport against a real nats-server:
rows equal to ``projector.timeline.timeline`` over the WAL history, paging, the ``step`` and
``until_seq`` filters, ``dt_ms`` stable across pages, errors, auth and the scrub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.producer import Ack, Producer
from kernel.scrub import scrub_text
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.envelope import Envelope
from locator.subjects import wal_subject
from locator.topology import Topology, default_topology
from projector.replay import history
from projector.snapshots import SnapshotStore
from projector.timeline import TimelineRow, summarize, timeline

ADMIN = "tok-admin-timeline-7e20aa"
READER = "tok-acme-reader-timeline-51c3"
OTHER = "tok-globex-reader-timeline-9d04"
H = {"Authorization": f"Bearer {ADMIN}"}
BASE = "/api/v1/tenants/{tenant}/projects/{project}/executions"
X, NOISE = "7100000001", "7100000002"
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
ROW_FIELDS = set(TimelineRow.__struct_fields__)


def url(execution_id: str, tenant: str = "acme", project: str = "web") -> str:
    return BASE.format(tenant=tenant, project=project) + f"/{execution_id}/timeline"


def at(ms: int, base: datetime = T0) -> str:
    return (base + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ev(type: str, ms: int, *, execution_id: str = X, **kw: Any) -> Envelope:
    return new_event(tenant="acme", project="web", execution_id=execution_id, type=type, ts=at(ms), **kw)


def noise(ms: int) -> Envelope:
    # Another execution on the same shard, stamped years later: a dt taken from it would be huge.
    return new_event(tenant="acme", project="web", execution_id=NOISE, type="user.noise", ts=at(ms, T0.replace(year=2030)))


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[
            TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN),
            TokenSpec(name="acme-reader", role="read", tenants=("acme",), token=READER),
            TokenSpec(name="globex-reader", role="read", tenants=("globex",), token=OTHER),
        ],
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
    )
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
        yield c


class Wal(msgspec.Struct):
    """What a test wrote: the seqs of X's events, of the noise and of the poison."""

    mine: list[int]
    noise: list[int]
    poison: int


@pytest.fixture
async def wal(js: JetStreamContext, topology: Topology) -> Wal:
    """X's history (12 events, uneven gaps, two steps run twice) interleaved with noise and one poison message."""
    producer = Producer(js, topology)
    shard = shard_for("acme", "web", "", topology.shard_count)
    plan: list[Envelope | str] = [
        noise(0),  # seq 1 is not X's: until_seq=1 is an empty page of a known execution
        ev("execution.requested", 0, payload={"playbook": {"path": "demo/x", "version": 2}, "workload": {"n": 3}}),
        ev("execution.started", 5),
        ev("step.enter", 12, step="a", attempt=1, payload={"from": None}),
        noise(1),
        ev("step.exit", 250, step="a", attempt=1, payload={"result": {"rows": 7}}),
        "poison",
        ev("user.note", 251, payload={"text": "hello"}),
        ev("step.enter", 300, step="b", attempt=1, payload={"from": "a"}),
        noise(2),
        ev("call.error", 1300, step="b", attempt=1, payload={"error": {"type": "timeout", "message": "took too long"}}),
        ev("step.retry", 1301, step="b", attempt=2),
        ev("step.exit", 1500, step="b", attempt=2, payload={"result": [1, 2, 3]}),
        ev("step.enter", 1500, step="c", attempt=1, payload={"from": "b"}),
        ev("step.exit", 1700, step="c", attempt=1, payload={"result": None}),
        ev("execution.completed", 1800),
    ]
    out = Wal(mine=[], noise=[], poison=0)
    for item in plan:
        if isinstance(item, str):
            subject = wal_subject(shard, "acme", "web", X, "user.bad")
            out.poison = (await js.publish(subject, b"{not json", headers={"Nats-Msg-Id": "poison-x"})).seq
            continue
        ack = await producer.publish(item)
        (out.mine if item.execution_id == X else out.noise).append(ack.seq)
    return out


async def expected(js: JetStreamContext, execution_id: str = X, affinity: str = "") -> list[dict[str, Any]]:
    """The rows ``timeline()`` makes of the execution's WAL history, as JSON."""
    shard = shard_for("acme", "web", affinity, 4)
    events = [e async for e in history(js, shard=shard, shard_count=4, tenant="acme", project="web", execution_id=execution_id)]
    rows: list[dict[str, Any]] = msgspec.to_builtins(list(timeline(events)))
    return rows


async def get(client: httpx.AsyncClient, execution_id: str = X, **params: Any) -> dict[str, Any]:
    resp = await client.get(url(execution_id), params=params, headers=H)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"rows", "next_after_seq"}
    return body


async def paged(
    client: httpx.AsyncClient, limit: int, execution_id: str = X, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every row, following ``next_after_seq`` from ``after_seq`` 0; and how many pages it took."""
    rows: list[dict[str, Any]] = []
    after, pages = 0, 0
    while True:
        body = await get(client, execution_id, limit=limit, after_seq=after, **params)
        pages += 1
        assert len(body["rows"]) <= limit and pages < 500
        rows += body["rows"]
        if body["next_after_seq"] is None:
            assert len(body["rows"]) < limit
            return rows, pages
        assert len(body["rows"]) == limit and body["next_after_seq"] == body["rows"][-1]["seq"]
        after = body["next_after_seq"]


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["instance"] == resp.request.url.path and body["detail"]
    return body


# --- rows -------------------------------------------------------------------------------------


async def test_rows_are_the_timeline_of_the_wal_history(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal, spans: Any) -> None:
    want = await expected(js)
    body = await get(client, limit=1000)
    assert body["rows"] == want and body["next_after_seq"] is None
    rows = body["rows"]
    assert [r["seq"] for r in rows] == wal.mine  # noise and poison are not X's rows
    assert all(set(r) == ROW_FIELDS for r in rows)
    assert [r["dt_ms"] for r in rows] == [None, 5, 7, 238, 1, 49, 1000, 1, 199, 0, 200, 100]
    assert [r["type"] for r in rows][:3] == ["execution.requested", "execution.started", "step.enter"]
    assert rows[0]["summary"] == 'playbook demo/x v2, workload {"n":3}'
    assert rows[6]["summary"] == "error timeout: took too long" and rows[6]["attempt"] == 1
    # The default page is 100 rows: all of them here.
    assert (await get(client)) == body
    finished = [s for s in spans.get_finished_spans() if s.name == "edge.read.timeline"]
    assert [(s.attributes or {}).get("noetl.rows") for s in finished if (s.attributes or {}).get("noetl.execution_id") == X] == [12, 12]


async def test_pages_concatenate_to_the_one_page_result(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal) -> None:
    want = await expected(js)
    for limit in (1, 2, 3, 5, 11, 12, 13):
        rows, pages = await paged(client, limit)
        assert rows == want, limit  # dt_ms included: the first row of a page has the same dt as on one page
        assert pages == len(want) // limit + 1
    # A later page on its own: its first dt_ms is measured from the execution's previous event.
    page = await get(client, after_seq=wal.mine[3], limit=2)
    assert page["rows"] == want[4:6] and page["rows"][0]["dt_ms"] == 1


async def test_after_seq_on_another_executions_event_or_on_poison(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal) -> None:
    want = await expected(js)
    for after in (*wal.noise, wal.poison):
        body = await get(client, after_seq=after, limit=1000)
        assert body["rows"] == [r for r in want if r["seq"] > after], after  # dt_ms included
    # Past the end: an empty last page.
    assert await get(client, after_seq=wal.mine[-1]) == {"rows": [], "next_after_seq": None}


async def test_step_filter_pages_and_keeps_dt_of_the_whole_history(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal) -> None:
    want = await expected(js)
    b = [r for r in want if r["step"] == "b"]
    assert [r["type"] for r in b] == ["step.enter", "call.error", "step.retry", "step.exit"]
    # dt_ms is from the execution's previous event, not from the previous row of step b.
    assert [r["dt_ms"] for r in b] == [49, 1000, 1, 199]
    for limit in (1, 2, 3, 4, 100):
        rows, pages = await paged(client, limit, step="b")
        assert rows == b and pages == len(b) // limit + 1, limit
    for step in ("a", "c"):
        assert (await get(client, step=step))["rows"] == [r for r in want if r["step"] == step]
    # A step the execution never ran: an empty page, not a 404.
    assert await get(client, step="nope") == {"rows": [], "next_after_seq": None}


async def test_until_seq_stops_after_that_seq(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal) -> None:
    want = await expected(js)
    for until in sorted({*wal.mine, *wal.noise, wal.poison}):
        rows, _ = await paged(client, 2, until_seq=until)
        assert rows == [r for r in want if r["seq"] <= until], until
    # Seq 1 is the noise, before X's first event: a known execution with no row yet.
    assert wal.noise[0] == 1 and await get(client, until_seq=1) == {"rows": [], "next_after_seq": None}
    both, _ = await paged(client, 1, step="b", until_seq=wal.mine[7])
    assert both == [r for r in want if r["step"] == "b" and r["seq"] <= wal.mine[7]] and len(both) == 3
    # A full last page that ends at until_seq is followed by an empty one (after_seq == until_seq is allowed).
    body = await get(client, after_seq=wal.mine[2], until_seq=wal.mine[2])
    assert body == {"rows": [], "next_after_seq": None}


async def test_a_long_history_pages_by_100(client: httpx.AsyncClient, js: JetStreamContext, topology: Topology) -> None:
    x = "7100000003"
    events = [ev("execution.requested", 0, execution_id=x, payload={"playbook": None, "workload": {}})]
    events += [ev(f"user.e{i % 7}", 10 * i + i % 3, execution_id=x, payload={"i": i}) for i in range(1, 230)]
    acks = await Producer(js, topology).publish_many(events)
    assert all(isinstance(a, Ack) for a in acks)
    want = await expected(js, x)
    first = await get(client, x)
    assert first["rows"] == want[:100] and first["next_after_seq"] == want[99]["seq"]
    assert (await get(client, x, limit=1000))["rows"] == want
    rows, pages = await paged(client, 100, x)
    assert rows == want and pages == 3


async def test_affinity_is_part_of_the_address(client: httpx.AsyncClient, js: JetStreamContext, topology: Topology) -> None:
    affinity = next(a for a in ("eu-1", "eu-2", "eu-3", "us-1", "us-2") if shard_for("acme", "web", a, 4) != shard_for("acme", "web", "", 4))
    x = "7100000004"
    await Producer(js, topology).publish(new_event(tenant="acme", project="web", execution_id=x, affinity=affinity, type="execution.started"))
    body = (await client.get(url(x), params={"affinity": affinity}, headers=H)).json()
    assert body["rows"] == await expected(js, x, affinity) and len(body["rows"]) == 1
    assert_problem(await client.get(url(x), headers=H), 404)


# --- errors -----------------------------------------------------------------------------------


async def test_unknown_execution_is_404(client: httpx.AsyncClient, wal: Wal) -> None:
    for params in ({}, {"step": "a"}, {"until_seq": 3}, {"after_seq": 2}):
        body = assert_problem(await client.get(url("7199999999"), params=params, headers=H), 404)
        assert body["detail"] == ("unknown execution 7199999999 of acme/web "
                                  "(asked without an affinity: if it was started with one, ask with ?affinity=<a>)")
    # Another project (and another tenant) does not see X.
    assert_problem(await client.get(url(X, project="other"), headers=H), 404)
    assert_problem(await client.get(url(X, tenant="globex"), headers=H), 404)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after_seq": "-1"}, "after_seq"),
        ({"after_seq": "²"}, "after_seq"),
        ({"after_seq": "1.5"}, "after_seq"),
        ({"until_seq": "0"}, "until_seq"),
        ({"until_seq": "x"}, "until_seq"),
        ({"after_seq": "5", "until_seq": "4"}, "until_seq"),
        ({"step": ""}, "step"),
        ({"step": "has space"}, "step"),
        ({"step": "s" * 129}, "step"),
        ({"affinity": "EU"}, "affinity"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(client: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    # No execution exists: a 422 (not a 404) shows the parameters are checked before the WAL is read.
    body = assert_problem(await client.get(url(X), params=params, headers=H), 422)
    assert body["field"] == field, body


async def test_a_bad_execution_id_is_422_before_the_token(client: httpx.AsyncClient) -> None:
    assert assert_problem(await client.get(url("0123")), 422)["field"] == "execution_id"


async def test_auth(client: httpx.AsyncClient, js: JetStreamContext, wal: Wal) -> None:
    assert_problem(await client.get(url(X)), 401)
    assert_problem(await client.get(url(X), headers={"Authorization": "Bearer nope"}), 401)
    body = assert_problem(await client.get(url(X), headers={"Authorization": f"Bearer {OTHER}"}), 403)
    assert "tenant 'acme'" in body["detail"]
    resp = await client.get(url(X), headers={"Authorization": f"Bearer {READER}"})
    assert resp.status_code == 200 and resp.json()["rows"] == await expected(js)


# --- the scrub --------------------------------------------------------------------------------


async def test_payloads_and_summaries_are_scrubbed(client: httpx.AsyncClient, js: JetStreamContext, topology: Topology) -> None:
    x = "7100000005"
    secret = "hunter2-very-long-secret-value"
    leaky = ev("user.login", 0, execution_id=x, payload={"a": "x" * 20, "password": secret})
    # Summarised raw, the summary is cut inside the secret, where the response scrub no longer sees a pair.
    assert "hunter2" in scrub_text(summarize(leaky))
    events = [
        ev("execution.requested", 0, execution_id=x, payload={"playbook": None, "workload": {"dsn": "postgres://ada:pw@db/app"}}),
        leaky,
        ev("step.exit", 5, execution_id=x, step="q", attempt=1,
           payload={"result": {"url": "postgres://ada:hunter2hunter2@db.internal.example/app?sslmode=require"}}),
    ]
    acks = await Producer(js, topology).publish_many(events)
    rows = (await get(client, x))["rows"]
    text = msgspec.json.encode(rows).decode()
    assert "hunter2" not in text and "pw@" not in text
    assert rows[0]["payload"]["workload"] == {"dsn": "***"}
    assert rows[1]["payload"] == {"a": "x" * 20, "password": "***"}
    assert rows[1]["summary"] == '{"a":"xxxxxxxxxxxxxxxxxxxx","password":"***"}'
    assert rows[2]["payload"]["result"]["url"].startswith("postgres://ada:***@db.internal")
    # The WAL keeps what was written.
    assert isinstance(acks[1], Ack)
    stored = await js.get_msg(acks[1].stream, acks[1].seq)
    assert secret.encode() in (stored.data or b"")


async def test_a_page_reads_at_most_the_replay_limit_and_says_where_to_go_on(
    nats_server: EmbeddedServer, js: JetStreamContext, wal: Wal, tmp_path: Path
) -> None:
    # A step filter on a long history must not scan it all in one request: past the replay limit the page
    # stops, short, with next_after_seq at the last event it read; following it gives every row.
    want = await expected(js)
    b = [r for r in want if r["step"] == "b"]
    small = create_app(topology=default_topology(nats_url=nats_server.url), replay_limit=3,
                       tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)],
                       snapshots=SnapshotStore(f"file://{tmp_path}/objects"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small), base_url="http://edge") as c:
            rows: list[dict[str, Any]] = []
            after, short_pages = 0, 0
            for _ in range(50):
                body = await get(c, after_seq=after, limit=100, step="b")
                rows += body["rows"]
                if body["next_after_seq"] is None:
                    break
                assert body["next_after_seq"] > after
                short_pages += len(body["rows"]) < 100
                after = body["next_after_seq"]
            assert rows == b  # dt_ms included
            assert short_pages >= 3  # 12 events of X, 3 a request
            # The slow path (after_seq on another execution's event) is bounded too: past the limit the
            # first row's dt_ms is unknown (null) rather than the request unbounded.
            late = await get(c, after_seq=wal.noise[-1], limit=1)
            assert late["rows"][0]["seq"] == next(r["seq"] for r in want if r["seq"] > wal.noise[-1])
            assert late["rows"][0]["dt_ms"] is None
    finally:
        await small.state.edge.cells.close()
