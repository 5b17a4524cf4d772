"""No projection outgrows what its store accepts, through a real ``noetl-edge up`` (issue 13, item 4).

Twenty ``user.*`` events of 60 KB on one execution: the projection keeps their
newest payloads within the byte budget and says which ones it left out; twenty
steps with 60 KB results: the projection is larger than a KV value and is
stored by reference. Either way the shard goes on folding other executions
promptly, nothing is dead-lettered, and the served projection equals a fresh
fold of the WAL.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from locator.shard import shard_for
from locator.subjects import dlq_stream
from projector.cache import KvProjectionCache
from projector.projection import USER_PAYLOAD_BUDGET, canonical
from tests.e2e.conftest import SHARDS, Stack, check_invariant, executions_url

TENANT = "sizes"
SIXTY_KB = 60_000
FOLD_WAIT = 30.0  # generous: folding takes a fraction of a second when the shard is not stalled


async def start(edge: httpx.AsyncClient, project: str) -> str:
    resp = await edge.post(executions_url(TENANT, project), json={"workload": {"n": 1}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["execution_id"])


async def post(edge: httpx.AsyncClient, project: str, execution_id: str, events: list[dict[str, Any]]) -> int:
    """POST events through the edge's events route; the WAL sequence of the last one."""
    resp = await edge.post(executions_url(TENANT, project, execution_id) + "/events", json={"events": events})
    assert resp.status_code == 200, resp.text
    return int(resp.json()["acks"][-1]["seq"])


async def folded(edge: httpx.AsyncClient, project: str, execution_id: str, seq: int, *, source: str) -> dict[str, Any]:
    """Poll the edge (without min_seq, which would fold the WAL tail itself) until the kernel has folded ``seq``."""
    deadline = time.monotonic() + FOLD_WAIT
    seen = ""
    while time.monotonic() < deadline:
        resp = await edge.get(executions_url(TENANT, project, execution_id))
        if resp.status_code == 200:
            body: dict[str, Any] = resp.json()
            seen = f"last_seq {body['last_seq']} from {resp.headers['x-noetl-source']}"
            if body["last_seq"] >= seq and resp.headers["x-noetl-source"] == source:
                return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"execution {execution_id} not folded up to seq {seq} within {FOLD_WAIT}s ({seen})")


async def another_one_folds(edge: httpx.AsyncClient, project: str) -> None:
    """An execution started after the big one was folded is folded too (the shard was never held up)."""
    execution_id = await start(edge, project)
    seq = await post(edge, project, execution_id, [{"type": "user.note", "payload": {"text": "and another"}}])
    await folded(edge, project, execution_id, seq, source="cache")


async def dead_letters(js: JetStreamContext, shard: int) -> int:
    try:
        return int((await js.stream_info(dlq_stream(shard))).state.messages)
    except NotFoundError:
        return 0


async def test_twenty_60kb_user_events_keep_the_shard_folding_and_say_what_was_left_out(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    project = "user-events"
    shard = shard_for(TENANT, project, "", SHARDS)
    big = await start(edge, project)
    last = 0
    for first in range(0, 20, 5):  # 300 KB a request, under the edge's 1 MiB body limit
        notes = [{"type": "user.blob", "payload": {"i": i, "blob": "b" * SIXTY_KB}} for i in range(first, first + 5)]
        last = await post(edge, project, big, notes)

    # A later execution on the same shard (same tenant and project) is folded by the kernel promptly.
    later = await start(edge, project)
    note = await post(edge, project, later, [{"type": "user.note", "payload": {"text": "after the big one"}}])
    after = await folded(edge, project, later, note, source="cache")
    assert after["user_events"][0]["payload"] == {"text": "after the big one"}

    served = await folded(edge, project, big, last, source="cache")
    kept = served["user_events"]
    sizes = [len(msgspec.json.encode({"i": i, "blob": "b" * SIXTY_KB})) for i in range(20)]  # compact JSON
    whole = next(n for n in range(20) if sum(sizes[19 - n :]) > USER_PAYLOAD_BUDGET)  # the newest that fit: 4
    assert served["user_event_count"] == 20 and len(kept) == 20 and whole == 4
    assert [e["payload_omitted"] for e in kept] == [True] * (20 - whole) + [False] * whole
    assert [e["payload_bytes"] for e in kept] == sizes
    assert all(e["payload"] == {} for e in kept[: 20 - whole])
    assert [e["payload"]["i"] for e in kept[20 - whole :]] == list(range(20 - whole, 20))
    assert await check_invariant(stack_js, edge, TENANT, project, big) is not None
    assert await check_invariant(stack_js, edge, TENANT, project, later) is not None
    await another_one_folds(edge, project)
    assert await dead_letters(stack_js, shard) == 0


async def test_a_projection_larger_than_a_kv_value_is_served_by_reference(
    stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient
) -> None:
    project = "big-steps"
    shard = shard_for(TENANT, project, "", SHARDS)
    big = await start(edge, project)
    last = 0
    for first in range(0, 20, 5):
        exits = [{"type": "step.exit", "step": f"s{i}", "attempt": 1, "payload": {"result": "r" * SIXTY_KB}}
                 for i in range(first, first + 5)]  # fmt: skip
        last = await post(edge, project, big, exits)

    later = await start(edge, project)
    note = await post(edge, project, later, [{"type": "user.note", "payload": {"text": "after the big one"}}])
    await folded(edge, project, later, note, source="cache")

    # The kernel stored it as a one-row segment and a pointer; the edge serves it from there.
    served = await folded(edge, project, big, last, source="snapshot")
    assert len(served["steps"]) == 20 and served["steps"]["s19"]["result"] == "r" * SIXTY_KB
    cache = await KvProjectionCache.open(stack_js, shard)
    entry = await cache.get(big)
    assert entry is not None and entry.pointer is not None and entry.pointer.status == "RUNNING"
    assert entry.pointer.last_seq == last
    fresh = await check_invariant(stack_js, edge, TENANT, project, big)
    assert len(canonical(fresh)) > cache.max_value

    # It goes on: more events of the big execution are folded onto the projection behind the pointer.
    done = await post(edge, project, big, [{"type": "execution.completed", "payload": {}}])
    ended = await folded(edge, project, big, done, source="snapshot")
    assert ended["status"] == "COMPLETED"
    assert await check_invariant(stack_js, edge, TENANT, project, big) is not None
    await another_one_folds(edge, project)
    assert await dead_letters(stack_js, shard) == 0
