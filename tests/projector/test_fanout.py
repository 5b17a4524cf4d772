"""fan_out: at most `limit` calls at once, results in order, nothing left running after an error."""

from __future__ import annotations

import asyncio

import pytest

from projector.fanout import fan_out


async def test_at_most_limit_run_at_once_and_results_keep_the_items_order() -> None:
    running = peak = 0

    async def call(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (x % 3))
        running -= 1
        return x * x

    assert await fan_out(call, range(50), limit=7) == [x * x for x in range(50)]
    assert peak == 7
    assert await fan_out(call, [], limit=7) == []


async def test_after_an_error_no_item_starts_and_the_calls_under_way_end_first() -> None:
    started: list[int] = []
    ended: list[int] = []

    async def call(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("item 3")
        await asyncio.sleep(0.02)
        ended.append(x)
        return x

    with pytest.raises(ValueError, match="item 3"):
        await fan_out(call, range(100), limit=4)
    assert sorted(started) == [0, 1, 2, 3]  # the four first taken; none after the error
    assert sorted(ended) == [0, 1, 2]  # and those under way had ended when the error was raised
