"""Running one coroutine per item of a batch, a bounded number at a time.

The system playbooks handle a batch's executions concurrently, at most N at
once. They did it with one task per item queued on an ``asyncio.Semaphore``;
on Python 3.11 every acquire looks at every waiter (``Semaphore.locked``), so
a batch of a few thousand executions spent O(n²) in the semaphore alone (5 %
of the kernel's CPU while it folded a flood). :func:`fan_out` runs ``limit``
workers that take the items in turn instead.

>>> import asyncio
>>> async def double(x: int) -> int:
...     await asyncio.sleep(0)
...     return 2 * x
>>> asyncio.run(fan_out(double, range(5), limit=2))
[0, 2, 4, 6, 8]
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


async def fan_out(fn: Callable[[T], Awaitable[R]], items: Iterable[T], *, limit: int) -> list[R]:
    """``fn`` on every item, at most ``limit`` at once; the results in the items' order.

    If a call raises, no worker starts another item; the first error is raised once the calls under way
    have ended (none is left running behind the caller's back).
    """
    todo = list(items)
    results: list[R | None] = [None] * len(todo)
    taken = 0
    failed = False

    async def worker() -> None:
        nonlocal taken, failed
        while not failed and taken < len(todo):
            i, taken = taken, taken + 1
            try:
                results[i] = await fn(todo[i])
            except BaseException:
                failed = True
                raise

    ended = await asyncio.gather(*(worker() for _ in range(min(limit, len(todo)))), return_exceptions=True)
    for outcome in ended:
        if isinstance(outcome, BaseException):
            raise outcome
    return cast(list[R], results)
