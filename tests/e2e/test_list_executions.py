"""Listing executions (``GET …/executions``) on a real ``noetl-edge up``: filters, order, paging, scoping, archives.

Executions are made the way a user makes them: events published straight to
the WAL subjects of their shard (two affinities, so one project spans two
shards), and real runs of an example playbook; the kernel folds them, and
the visibility index is what the listing reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from locator.envelope import encode_envelope, envelope_from_dict
from locator.ids import Snowflake
from locator.shard import shard_for
from locator.subjects import wal_subject
from locator.topology import default_topology
from projector.archive import Archiver, HistoryArchive
from projector.snapshots import SnapshotStore
from projector.visibility import key_of
from locator.subjects import vis_bucket
from tests.e2e.conftest import EXAMPLES, SHARDS, Stack, executions_url, wal_events

A, B, PROJECT = "vis-a", "vis-b", "p"
# What each raw execution publishes, by the status it ends in (steps: step.enter/step.exit pairs).
SCRIPTS: dict[str, list[tuple[str, str | None]]] = {
    "PENDING": [("execution.requested", None)],
    "RUNNING": [("execution.requested", None), ("execution.started", None), ("step.enter", "a"), ("step.exit", "a"),
                ("step.enter", "b")],
    "WAITING": [("execution.requested", None), ("execution.started", None), ("callback.waiting", "cb")],
    "COMPLETED": [("execution.requested", None), ("execution.started", None), ("step.enter", "a"), ("step.exit", "a"),
                  ("execution.completed", None)],
    "FAILED": [("execution.requested", None), ("execution.started", None), ("step.enter", "a"), ("call.error", "a"),
               ("execution.failed", None)],
    "CANCELLED": [("execution.requested", None), ("execution.cancelled", None)],
}
STEPS = {"PENDING": {}, "RUNNING": {"COMPLETED": 1, "RUNNING": 1}, "WAITING": {"WAITING": 1},
         "COMPLETED": {"COMPLETED": 1}, "FAILED": {"ERROR": 1}, "CANCELLED": {}}
TOKENS = [
    TokenSpec(name="a-reader", role="read", tenants=(A,), token="token-a"),
    TokenSpec(name="b-reader", role="read", tenants=(B,), token="token-b"),
]


async def publish(js: JetStreamContext, tenant: str, affinity: str, execution_id: str, status: str) -> None:
    shard = shard_for(tenant, PROJECT, affinity, SHARDS)
    for i, (type_, step) in enumerate(SCRIPTS[status]):
        doc: dict[str, Any] = {"tenant": tenant, "project": PROJECT, "affinity": affinity, "execution_id": execution_id,
                               "type": type_, "event_id": f"{execution_id}-{i}"}
        if step is not None:
            doc["step"], doc["attempt"] = step, 1
        if type_ == "execution.requested":
            doc["payload"] = {"playbook": None, "workload": {"n": i}}
        if type_ == "call.error":
            doc["payload"] = {"error": "boom"}
        env = envelope_from_dict(doc, fill=True)
        await js.publish(wal_subject(shard, tenant, PROJECT, execution_id, type_), encode_envelope(env),
                         headers={"Nats-Msg-Id": env.event_id})


async def list_all(
    client: httpx.AsyncClient, tenant: str, *, headers: dict[str, str] | None = None, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every page of a listing: the rows in order and the number of pages."""
    rows: list[dict[str, Any]] = []
    token = None
    pages = 0
    while True:
        resp = await client.get(executions_url(tenant, PROJECT), params={**params, **({"page_token": token} if token else {})},
                                headers=headers)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"executions", "next_page_token"}
        rows += body["executions"]
        pages += 1
        token = body["next_page_token"]
        if token is None:
            return rows, pages
        assert pages < 100, "paging does not end"


async def until_listed(client: httpx.AsyncClient, tenant: str, want: dict[str, str], timeout: float = 60) -> list[dict[str, Any]]:
    """Poll the listing until it shows exactly ``want`` (execution id → status)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows, _ = await list_all(client, tenant, limit=500)
        if {r["execution_id"]: r["status"] for r in rows} == want:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"listing of {tenant} never matched: {[(r['execution_id'], r['status']) for r in rows]} vs {want}")


@pytest.fixture
async def scoped(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An edge in this process on the stack's NATS and objects, with one read token per tenant."""
    app: Starlette = create_app(
        topology=default_topology(nats_url=stack.nats_url, shard_count=SHARDS), tokens=TOKENS,
        snapshots=SnapshotStore(f"file://{stack.data_dir.absolute()}/objects"),
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            yield client
    finally:
        await app.state.edge.cells.close()


async def test_filters_order_paging_and_scoping(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient, scoped: httpx.AsyncClient
) -> None:
    ids = Snowflake(node_id=11)
    assert shard_for(A, PROJECT, "", SHARDS) != shard_for(A, PROJECT, "eu", SHARDS)  # the project spans two shards
    want_a: dict[str, str] = {}
    affinity_of: dict[str, str] = {}
    for round_ in range(3):
        for status in SCRIPTS:
            x = ids.next_str()
            affinity_of[x] = "eu" if round_ == 1 else ""
            await publish(stack_js, A, affinity_of[x], x, status)
            want_a[x] = status
    want_b = {}
    for status in ("COMPLETED", "RUNNING"):
        x = ids.next_str()
        await publish(stack_js, B, "", x, status)
        want_b[x] = status
    runs = [stack.run(EXAMPLES / "linear.yaml", A, PROJECT) for _ in range(2)]
    for run in runs:
        assert run.projection is not None and run.projection["status"] == "COMPLETED", run.stderr
        want_a[run.execution_id] = "COMPLETED"

    rows = await until_listed(edge, A, want_a)
    await until_listed(edge, B, want_b)
    # Newest first by id; every summary is what its execution's projection says.
    assert [r["execution_id"] for r in rows] == sorted(want_a, key=int, reverse=True)
    for r in rows:
        x = r["execution_id"]
        assert (r["tenant"], r["project"]) == (A, PROJECT)
        resp = await edge.get(executions_url(A, PROJECT, x), params={"affinity": affinity_of.get(x, "")} if affinity_of.get(x) else {})
        assert resp.status_code == 200, resp.text
        p = resp.json()
        assert r["affinity"] == p["affinity"] and r["status"] == p["status"]
        assert (r["created_at"], r["updated_at"], r["last_seq"], r["event_count"]) == (
            p["created_at"], p["updated_at"], p["last_seq"], p["event_count"])
        assert r["ended_at"] == (p["updated_at"] if p["status"] in ("COMPLETED", "FAILED", "CANCELLED") else None)
        if x in affinity_of:
            assert r["steps"] == STEPS[want_a[x]] and r["playbook"] is None
        else:
            assert r["playbook"] == {"path": "examples/linear", "version": 1} and r["steps"] == {"COMPLETED": 3}

    # Paging: no duplicates, no gaps, the same order, whatever the page size.
    for limit in (1, 4, 7):
        paged, pages = await list_all(edge, A, limit=limit)
        assert [r["execution_id"] for r in paged] == [r["execution_id"] for r in rows]
        assert pages >= len(rows) // limit
    # Filters: one status, several, a playbook, an id range, a time range.
    failed, _ = await list_all(edge, A, status="FAILED", limit=2)
    assert [r["execution_id"] for r in failed] == sorted((x for x, s in want_a.items() if s == "FAILED"), key=int, reverse=True)
    some, _ = await list_all(edge, A, status="running,waiting", limit=3)
    assert {r["execution_id"] for r in some} == {x for x, s in want_a.items() if s in ("RUNNING", "WAITING")}
    both, _ = await list_all(edge, A, status=["PENDING", "CANCELLED"])
    assert {r["execution_id"] for r in both} == {x for x, s in want_a.items() if s in ("PENDING", "CANCELLED")}
    linear, _ = await list_all(edge, A, playbook="examples/linear", limit=1)
    assert [r["execution_id"] for r in linear] == [r.execution_id for r in reversed(runs)]
    ordered = sorted(want_a, key=int)
    window, _ = await list_all(edge, A, since=ordered[3], until=ordered[9], limit=4)
    assert [r["execution_id"] for r in window] == list(reversed(ordered[3:9]))
    assert (await list_all(edge, A, since="2026-01-01T00:00:00Z"))[0] == rows
    later = datetime.fromtimestamp(time.time() + 3600, tz=UTC).isoformat()
    assert (await list_all(edge, A, since=later))[0] == []
    assert (await list_all(edge, A, until="2026-01-01T00:00:00+00:00"))[0] == []

    # Scoping: a token of tenant A lists A and never B, and is refused B's listing.
    mine, _ = await list_all(scoped, A, limit=5, headers=bearer("token-a"))
    assert {r["execution_id"] for r in mine} == set(want_a)
    refused = await scoped.get(executions_url(B, PROJECT), headers={"Authorization": "Bearer token-a"})
    assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"
    theirs, _ = await list_all(scoped, B, headers=bearer("token-b"))
    assert {r["execution_id"] for r in theirs} == set(want_b)
    assert (await scoped.get(executions_url(A, PROJECT), headers=bearer("token-b"))).status_code == 403
    assert (await scoped.get(executions_url(A, PROJECT))).status_code == 401
    # The CLI lists the same, page by page, with the same filters.
    listed = stack.cli("executions", "list", "--tenant", A, "--project", PROJECT, "--all", "--limit", "3", "--json")
    assert msgspec.json.decode(listed.stdout)["executions"] == rows
    one = msgspec.json.decode(stack.cli("executions", "list", "--tenant", A, "--project", PROJECT, "--limit", "4").stdout)
    assert one["executions"] == rows[:4] and one["next_page_token"]
    two = stack.cli("executions", "list", "--tenant", A, "--project", PROJECT, "--limit", "4", "--page-token", one["next_page_token"])
    assert msgspec.json.decode(two.stdout)["executions"] == rows[4:8]
    cli_failed = stack.cli("executions", "list", "--tenant", A, "--project", PROJECT, "--status", "failed", "--status", "cancelled")
    assert [r["execution_id"] for r in msgspec.json.decode(cli_failed.stdout)["executions"]] == [
        r["execution_id"] for r in rows if r["status"] in ("FAILED", "CANCELLED")]
    cli_b = stack.cli("executions", "list", "--tenant", B, "--project", PROJECT, "--playbook", "examples/linear")
    assert msgspec.json.decode(cli_b.stdout) == {"executions": [], "next_page_token": None}
    # A token for other filters is refused, like any other bad input.
    first = (await edge.get(executions_url(A, PROJECT), params={"limit": 2})).json()
    resp = await edge.get(executions_url(A, PROJECT), params={"limit": 2, "status": "FAILED", "page_token": first["next_page_token"]})
    assert resp.status_code == 422 and resp.json()["field"] == "page_token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_archived_executions_are_still_listed(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    tenant = "vis-arch"
    ids = Snowflake(node_id=12)
    want = {}
    for status in ("COMPLETED", "FAILED", "CANCELLED", "RUNNING"):
        x = ids.next_str()
        await publish(stack_js, tenant, "", x, status)
        want[x] = status
    await until_listed(edge, tenant, want)
    # Listed with its status is not yet folded to the end: wait until each summary is at its WAL's last seq.
    last = {x: (await wal_events(stack_js, tenant, PROJECT, x))[-1].seq for x in want}
    deadline = time.monotonic() + 60
    while True:
        before, _ = await list_all(edge, tenant, limit=500)
        if {r["execution_id"]: r["last_seq"] for r in before} == last:
            break
        assert time.monotonic() < deadline, f"listing never caught up with the WAL: {before} vs {last}"
        await asyncio.sleep(0.1)
    shard = shard_for(tenant, PROJECT, "", SHARDS)
    await asyncio.sleep(1.5)  # materialize lingers 1 s
    archive = HistoryArchive.at(f"file://{stack.data_dir.absolute()}/objects")
    ended = [(tenant, PROJECT, x) for x, s in want.items() if s != "RUNNING"]
    report = await Archiver(stack_js, shard=shard, shard_count=SHARDS, archive=archive).archive_executions(ended)
    assert report.executions == 3
    # Their summaries left the hot index; the listing finds them in the archive's index, unchanged.
    kv = await stack_js.key_value(vis_bucket(shard))
    hot = {x for x, s in want.items() if s == "RUNNING"}
    for _, _, x in ended:
        with pytest.raises(Exception):
            await kv.get(key_of(tenant, PROJECT, x))
    for x in hot:
        assert (await kv.get(key_of(tenant, PROJECT, x))).value
    after, _ = await list_all(edge, tenant, limit=1)
    assert after == before
    archived_only, _ = await list_all(edge, tenant, status="COMPLETED,FAILED")
    assert [r["execution_id"] for r in archived_only] == sorted((x for x, s in want.items() if s in ("COMPLETED", "FAILED")), key=int, reverse=True)
    assert msgspec.json.decode(msgspec.json.encode(after)) == before
