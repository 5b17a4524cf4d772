"""The console at /ui/ in a real headless Chromium against a real ``noetl-edge up`` (edge, kernel, workers).

Each test saves a screenshot of every view it opens under its temp dir and prints the paths (``-s``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client as NATS
from playwright.async_api import Page, Request

from kernel.connect import close, connect
from locator.shard import shard_for
from tests.e2e.conftest import EXAMPLES, SHARDS, Stack, executions_url

TENANT = "console"


async def shot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


async def sign_in(page: Page, stack: Stack, project: str) -> None:
    await page.goto(f"{stack.http_url}/ui/")
    await page.fill("#token", stack.token)
    await page.click("#signin button")
    await page.wait_for_selector("#scope:not([hidden])")
    assert await page.text_content("#who") == "local-admin (admin)"
    await page.fill("#tenant", TENANT)
    await page.fill("#project", project)
    await page.click("#apply")


async def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_sign_in_list_execution_page_live_update_and_time_travel(stack: Stack, page: Page, tmp_path: Path) -> None:
    project = "flow"
    await sign_in(page, stack, project)
    # A token the edge refuses never gets past the sign-in (and is not kept).
    other = await page.context.new_page()
    await other.goto(f"{stack.http_url}/ui/")
    await other.fill("#token", "not-a-token")
    await other.click("#signin button")
    await other.wait_for_selector("#signin-error:has-text('refused')")
    await other.close()

    await page.wait_for_selector("#executions")
    run = await asyncio.to_thread(stack.run, EXAMPLES / "on_error.yaml", TENANT, project, timeout=90)
    assert run.returncode == 0, run.stderr
    eid = run.execution_id
    # The list shows the fresh execution without a reload (it re-reads the newest page and follows running rows).
    row = page.locator(f"#executions tr[data-id='{eid}']")
    await row.wait_for(timeout=30_000)
    await page.wait_for_selector(f"#executions tr[data-id='{eid}'][data-status='COMPLETED']", timeout=30_000)
    assert "examples/on-error@1" in await row.inner_text()
    await shot(page, tmp_path, "1-list")

    await page.click(f"#executions tr[data-id='{eid}'] a")
    await page.wait_for_selector("#graph g.node[data-step='risky']")
    async with stack.client() as api:
        now = (await api.get(executions_url(TENANT, project, eid))).json()
    assert await page.text_content("#exec-status") == now["status"] == "COMPLETED"
    # The graph: each step coloured by its status; the failed step's on_error arc to `recover`.
    for step in ("risky", "recover", "finish"):
        assert await page.get_attribute(f"#graph g.node[data-step='{step}']", "data-status") == now["steps"][step]["status"]
    assert now["steps"]["risky"]["status"] in {"FAILED", "ERROR"}
    assert await page.locator("#graph path.arc.on-error[data-from='risky'][data-to='recover']").count() == 1
    assert await page.locator("#graph path.arc.next[data-from='recover'][data-to='finish']").count() == 1
    # The waterfall: each attempt of `risky` its own bar (a retry), queue time apart from run time.
    await page.wait_for_selector("#waterfall .wf-row[data-step='risky']")
    assert await page.locator("#waterfall .wf-row[data-step='risky']").count() == now["steps"]["risky"]["attempts"] == 2
    assert await page.locator("#waterfall .bar[data-kind='queue'][data-step='risky']").count() == 2
    assert await page.locator("#waterfall .bar[data-kind='run'][data-step='risky']").count() == 2
    # The timeline: every event of the execution, in seq order, with its type.
    await page.wait_for_function(f"document.querySelectorAll('#timeline .tl-row').length >= {now['event_count']}")
    seqs = [int(s) for s in await page.eval_on_selector_all("#timeline .tl-row", "rows => rows.map(r => r.dataset.seq)")]
    assert seqs == sorted(seqs) and len(seqs) == now["event_count"] and seqs[-1] == now["last_seq"]
    assert await page.locator("#timeline .tl-row.t-error[data-type='call.error']").count() == 2
    await shot(page, tmp_path, "2-execution")

    # Publishing an event updates the open page, without a reload (a marker on window survives).
    await page.evaluate("window.__noReload = true")
    async with stack.client() as api:
        resp = await api.post(executions_url(TENANT, project, eid) + "/events", json=[{"type": "user.note", "payload": {"from": "test"}}])
        assert resp.status_code == 200, resp.text
        seq = resp.json()["acks"][0]["seq"]
    await page.wait_for_selector(f"#timeline .tl-row[data-seq='{seq}'][data-type='user.note']", timeout=20_000)
    await page.wait_for_selector(f"#exec-last-seq:text-is('{seq}')", timeout=20_000)
    assert await page.evaluate("window.__noReload") is True

    # Time travel: the seq of the first call.error; the projection then, and the diff to now.
    types = await page.eval_on_selector_all("#timeline .tl-row", "rows => rows.map(r => [Number(r.dataset.seq), r.dataset.type])")
    first_error = next(s for s, t in types if t == "call.error")
    await page.click(f"#timeline .tl-row[data-seq='{first_error}']")
    assert await page.input_value("#tt-seq") == str(first_error)
    await page.click("#tt-go")
    await page.wait_for_selector("#tt-summary")
    async with stack.client() as api:
        then = (await api.get(executions_url(TENANT, project, eid), params={"as_of_seq": first_error})).json()
    assert then["last_seq"] == first_error
    assert await page.get_attribute("#tt-summary", "data-last-seq") == str(first_error)
    assert await page.get_attribute("#tt-summary", "data-status") == then["status"] == "RUNNING"
    assert await page.get_attribute("#graph g.node[data-step='risky']", "data-status") == then["steps"]["risky"]["status"] == "ERROR"
    assert await page.get_attribute("#graph g.node[data-step='recover']", "data-status") == "NOT_REACHED"
    diff = await page.eval_on_selector_all("#tt-diff tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert "status" in diff and "steps.risky.status" in diff and "last_seq" in diff
    await shot(page, tmp_path, "3-time-travel")

    # Back to now, and a step's result, as JSON.
    await page.click("#tt-now")
    await page.wait_for_selector("#tt-banner[hidden]", state="attached")
    assert await page.get_attribute("#graph g.node[data-step='recover']", "data-status") == "COMPLETED"
    await page.click("#steps tr[data-step='recover']")
    await page.wait_for_selector("#result-panel pre.json")
    assert json.loads(await page.text_content("#result-panel pre.json")) == "recovered"


async def test_dead_letters_of_a_shard(stack: Stack, page: Page, tmp_path: Path) -> None:
    project = "poison"
    shard = shard_for(TENANT, project, "", SHARDS)
    nc: NATS = await connect([stack.nats_url], name="pytest-console")
    try:
        subject = f"wal.{shard}.{TENANT}.{project}.4242.user.bad"
        await nc.jetstream().publish(subject, b"this is not an envelope", headers={"Nats-Msg-Id": "console-poison-1"})
    finally:
        await close(nc)
    async with stack.client() as api:
        async def filed() -> list[dict[str, Any]]:
            body = (await api.get("/api/v1/dead-letters", params={"shard": shard})).json()
            return [d for d in body["dead_letters"] if d["subject"] == subject]

        [letter] = await wait_for(filed, "the poison message in DLQ")
    await sign_in(page, stack, project)
    await page.click("#nav-dlq")
    await page.select_option("#dlq-shard", str(shard))
    row = page.locator(f"#dead-letters tr[data-seq='{letter['seq']}']")
    await row.wait_for()
    text = await row.inner_text()
    assert letter["reason"] in text and subject in text and "this is not an envelope" in text
    await shot(page, tmp_path, "4-dead-letters")


async def test_a_10000_event_timeline_scrolls_in_pages(stack: Stack, page: Page, tmp_path: Path) -> None:
    project = "long"
    total = 10_000
    async with stack.client() as api:
        started = (await api.post(executions_url(TENANT, project), json={})).json()
        eid = started["execution_id"]
        last = 0
        for i in range(0, total, 500):
            docs = [{"type": "user.tick", "event_id": f"tick-{n}", "payload": {"n": n}} for n in range(i, i + 500)]
            resp = await api.post(executions_url(TENANT, project, eid) + "/events", json=docs)
            assert resp.status_code == 200, resp.text
            last = resp.json()["acks"][-1]["seq"]
        resp = await api.get(executions_url(TENANT, project, eid), params={"min_seq": last}, timeout=60)
        assert resp.json()["event_count"] == total + 1
    requests: list[str] = []

    def count(request: Request) -> None:
        if "/timeline?" in request.url:
            requests.append(request.url)

    page.on("request", count)
    await sign_in(page, stack, project)
    await page.goto(f"{stack.http_url}/ui/#/executions/{eid}")
    await page.wait_for_selector("#timeline .tl-row")
    await page.wait_for_selector("#tl-count:has-text('200 loaded')")
    dom_rows = await page.locator("#timeline .tl-row").count()
    assert dom_rows < 60, dom_rows
    assert len(requests) == 1, requests
    # Scroll to the end of what is loaded, five times: one page (200 rows) more each time, never all of them.
    for n in range(2, 7):
        await page.eval_on_selector("#timeline", "box => { box.scrollTop = box.scrollHeight; }")
        await page.wait_for_selector(f"#tl-count:has-text('{n * 200} loaded')")
        assert await page.locator("#timeline .tl-row").count() < 60
    assert len(requests) == 6, requests
    assert all("limit=200" in u for u in requests)
    seqs = [int(s) for s in await page.eval_on_selector_all("#timeline .tl-row", "rows => rows.map(r => r.dataset.seq)")]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
    ticks = [r["n"] for r in await page.eval_on_selector_all(
        "#timeline .tl-row[data-type='user.tick']", "rows => rows.map(r => JSON.parse(r.title))")]
    assert ticks and 1000 <= max(ticks) < 1200, ticks  # in the window: rows of the sixth page (ticks 1000..1199)
    await shot(page, tmp_path, "5-long-timeline")


async def test_stored_result_rows_a_waiting_callback_and_cancel(stack: Stack, page: Page, tmp_path: Path) -> None:
    big = await asyncio.to_thread(stack.run, EXAMPLES / "big_result.yaml", TENANT, "results", timeout=120)
    assert big.returncode == 0, big.stderr
    await sign_in(page, stack, "results")
    await page.goto(f"{stack.http_url}/ui/#/executions/{big.execution_id}")
    await page.click("#graph g.node[data-step='rows']")
    await page.wait_for_selector("#result-panel table.rows")
    # The stored result (40,000 rows) is shown as a table of its first 20 rows, with the total.
    assert await page.locator("#result-panel table.rows tbody tr").count() == 20
    assert "first 20 of 40000 rows" in await page.text_content("#result-ref")
    await shot(page, tmp_path, "6-stored-result")

    waiting = await asyncio.to_thread(stack.run, EXAMPLES / "callback.yaml", TENANT, "results", wait=False)
    eid = waiting.execution_id
    reads: list[str] = []

    def read(request: Request) -> None:
        if request.url.split("?")[0].endswith(executions_url(TENANT, "results", eid)):
            reads.append(request.url)

    page.on("request", read)
    await page.goto(f"{stack.http_url}/ui/#/executions/{eid}")
    # The callback step waits (shown live: the page may open before it gets there), with how to resume it.
    callback = page.locator("#callbacks li[data-step='approval']")
    await callback.wait_for(timeout=30_000)
    assert "resume with POST /api/v1/callbacks/" in await callback.inner_text()
    assert await page.get_attribute("#graph g.node[data-step='approval']", "data-status") == "WAITING"
    await shot(page, tmp_path, "7-waiting-callback")
    await page.evaluate("window.__noReload = true")
    await page.click("#cancel")
    await page.wait_for_selector("#exec-status:text-is('CANCELLED')", timeout=30_000)
    assert await page.evaluate("window.__noReload") is True
    async with stack.client() as api:
        final = (await api.get(executions_url(TENANT, "results", eid))).json()
    assert final["status"] == "CANCELLED"
    # A stream event is in the WAL before it is folded: the page's read after the last one asks for
    # a projection at least that new, or it could show the state before it and never be told again.
    # (An event after the one that showed CANCELLED may still be on its way to the page: wait for it.)

    async def read_after_the_last_event() -> bool:
        return reads[-1].endswith(f"?min_seq={final['last_seq']}")

    await wait_for(read_after_the_last_event, f"a read with min_seq={final['last_seq']}: {reads}", timeout=15)


async def test_the_graph_marks_parallel_branches_joins_and_loops(stack: Stack, page: Page, tmp_path: Path) -> None:
    parallel = await asyncio.to_thread(stack.run, EXAMPLES / "parallel.yaml", TENANT, "shapes", timeout=90)
    loop = await asyncio.to_thread(stack.run, EXAMPLES / "loop.yaml", TENANT, "shapes", timeout=90)
    assert parallel.returncode == 0 and loop.returncode == 0, parallel.stderr + loop.stderr
    await sign_in(page, stack, "shapes")
    await page.goto(f"{stack.http_url}/ui/#/executions/{parallel.execution_id}")
    await page.wait_for_selector("#graph g.node[data-step='merge'][data-status='COMPLETED']")
    assert "∥ parallel" in await page.text_content("#graph g.node[data-step='split']")
    assert "⋈ left+right" in await page.text_content("#graph g.node[data-step='merge']")
    for a, b in (("split", "left"), ("split", "right"), ("left", "merge"), ("right", "merge")):
        assert await page.locator(f"#graph path.arc.next[data-from='{a}'][data-to='{b}']").count() == 1
    await shot(page, tmp_path, "8-parallel")
    await page.goto(f"{stack.http_url}/ui/#/executions/{loop.execution_id}")
    await page.wait_for_selector("#graph g.node[data-step='total'][data-status='COMPLETED']")
    assert "↻ workload.items" in await page.text_content("#graph g.node[data-step='square']")
    # Each iteration of the loop is its own bar in the waterfall.
    await page.wait_for_selector("#waterfall .wf-row[data-step='square']")
    assert await page.locator("#waterfall .wf-row[data-step='square']").count() == 5
    await shot(page, tmp_path, "9-loop")
