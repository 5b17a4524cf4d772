"""The visibility index and the listing's paging on a real nats-server: order, bounds, tokens, several shards."""

from __future__ import annotations

import random
from typing import Any

import pytest
from nats.js import JetStreamContext

from locator.ids import EPOCH_MS, NODE_BITS, SEQ_BITS
from locator.subjects import vis_bucket
from projector import listing
from projector.archiveindex import ArchiveIndex
from projector.listing import BadPageToken, Cursor, ListQuery, decode_token, encode_token, list_page
from projector.visibility import ExecutionSummary, VisibilityIndex, day_hour, key_of

HOUR_MS = 3600 * 1000
# 2026-12-01T00:00Z as ms since the snowflake epoch.
BASE_MS = 1_796_083_200_000 - EPOCH_MS


def snowflake(ms: int, seq: int) -> str:
    return str((ms << (NODE_BITS + SEQ_BITS)) | seq)


def summary(execution_id: str, *, tenant: str = "acme", status: str = "COMPLETED", shard: int = 0) -> ExecutionSummary:
    return ExecutionSummary(
        execution_id=execution_id, tenant=tenant, project="web", affinity=f"a{shard}", status=status, playbook=None,
        created_at="", updated_at="", ended_at=None, steps={}, last_seq=1, event_count=1,
    )


async def fill(js: JetStreamContext, spread: dict[int, list[str]], *, tenant: str = "acme") -> dict[str, int]:
    """Write summaries on shards; the shard of each id."""
    where = {}
    for shard, ids in spread.items():
        index = VisibilityIndex(js, shard)
        for i, x in enumerate(ids):
            await index.put(summary(x, tenant=tenant, status=("COMPLETED", "FAILED", "RUNNING")[i % 3], shard=shard))
            where[x] = shard
    return where


async def pages(js: JetStreamContext, shards: list[int], q: ListQuery) -> tuple[list[tuple[int, str]], int]:
    async def source(shard: int) -> tuple[VisibilityIndex, ArchiveIndex]:
        return VisibilityIndex(js, shard), ArchiveIndex(js, shard, None)

    out: list[tuple[int, str]] = []
    cursor: Cursor | None = None
    count = 0
    while True:
        rows, cursor = await list_page(source, shards, q, cursor)
        count += 1
        assert len(rows) <= q.limit
        out += [(int(r.affinity[1:]), r.execution_id) for r in rows]
        if cursor is None:
            return out, count
        cursor = decode_token(encode_token(cursor, q), q)  # what a client sends back
        assert count < 1000


@pytest.mark.parametrize("budget", [3, 50, 2000])
async def test_pages_are_newest_first_without_gaps_or_repeats(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(listing, "HOT_BUDGET", budget)
    rng = random.Random(7)
    # Ids over three days, several in one hour, on three shards; one id on two shards (two affinities).
    moments = [BASE_MS + h * HOUR_MS + rng.randrange(HOUR_MS) for h in (0, 0, 0, 1, 5, 23, 24, 30, 47, 47, 47, 47)]
    ids = [snowflake(ms, i) for i, ms in enumerate(moments)]
    spread = {0: ids[0::3], 1: ids[1::3], 3: ids[2::3] + [ids[0]]}
    where = await fill(js, spread)
    await fill(js, {0: [snowflake(BASE_MS + 2 * HOUR_MS, 999)]}, tenant="other")
    want = sorted(((int(x), s) for s, xs in spread.items() for x in xs), reverse=True)
    for limit in (1, 2, 5, 500):
        got, count = await pages(js, [0, 1, 2, 3], ListQuery(tenant="acme", project="web", limit=limit))
        assert [(int(x), s) for s, x in got] == want, (limit, budget)
        assert count >= len(want) // limit
    failed, _ = await pages(js, [0, 1, 2, 3], ListQuery(tenant="acme", project="web", statuses=("FAILED",), limit=2))
    assert {x for _, x in failed} == {x for s, xs in spread.items() for i, x in enumerate(xs) if i % 3 == 1}
    lo, hi = sorted(int(x) for x in ids)[3], sorted(int(x) for x in ids)[9]
    window, _ = await pages(js, [0, 1, 2, 3], ListQuery(tenant="acme", project="web", since_id=lo, until_id=hi, limit=3))
    assert sorted({int(x) for _, x in window}, reverse=True) == sorted({i for i, _ in want if lo <= i < hi}, reverse=True)
    assert where


async def test_a_page_reads_within_its_budget(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of 5 summaries, no read asks for a bucket of more than 5 after the first read of a page."""
    reads: list[tuple[str, str | None, int, int]] = []
    real = VisibilityIndex.read

    async def counted(self: VisibilityIndex, tenant: str, project: str, day: str, hour: str | None, *, at_most: int) -> Any:
        got = await real(self, tenant, project, day, hour, at_most=at_most)
        reads.append((day, hour, at_most, -1 if got is None else len(got)))
        return got

    monkeypatch.setattr(VisibilityIndex, "read", counted)
    monkeypatch.setattr(listing, "HOT_BUDGET", 5)
    ids = [snowflake(BASE_MS + h * HOUR_MS + i, i) for h in range(0, 72, 2) for i in range(3)]
    await fill(js, {0: ids})
    got, count = await pages(js, [0], ListQuery(tenant="acme", project="web", limit=50))
    assert [x for _, x in got] == sorted(ids, key=int, reverse=True)
    assert count > 1  # 108 summaries at 5 (or one bucket) a page
    assert max(n for *_, n in reads) <= 5 or all(n <= 6 for *_, n in reads)


async def test_day_and_hour_keys(js: JetStreamContext) -> None:
    x = snowflake(BASE_MS + 25 * HOUR_MS, 1)
    assert day_hour(int(x)) == ("20261202", "01")
    index = VisibilityIndex(js, 2)
    await index.put(summary(x))
    kv = await js.key_value(vis_bucket(2))
    assert (await kv.get(key_of("acme", "web", x))).value
    assert await index.days("acme", "web") == ["20261202"]
    await index.forget(x)
    assert await index.read("acme", "web", "20261202", None, at_most=10) == []
    await index.forget(x)  # forgetting twice is harmless


def test_tokens_are_bound_to_their_filters() -> None:
    q = ListQuery(tenant="acme", project="web", statuses=("FAILED",))
    token = encode_token(Cursor(42, 1), q)
    assert decode_token(token, q) == Cursor(42, 1)
    with pytest.raises(BadPageToken, match="other filters"):
        decode_token(token, ListQuery(tenant="acme", project="web"))
    for bad in ("", "x", "!!!", token[:-3], "eyJ2IjoyfQ"):
        with pytest.raises(BadPageToken):
            decode_token(bad, q)
