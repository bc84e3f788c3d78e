"""The in-place retry queue: items come out when due, in due order, in batches."""

from __future__ import annotations

import asyncio
import time

from fastconn.delay_queue import DelayQueue


async def test_items_come_out_when_due_in_due_order() -> None:
    queue: DelayQueue[str] = DelayQueue()
    queue.push("late", 0.2)
    queue.push("early", 0.05)
    queue.push("now", 0)
    started = time.monotonic()
    assert await queue.next_due() == ["now"]
    assert await queue.next_due() == ["early"]
    assert time.monotonic() - started >= 0.05
    assert await queue.next_due() == ["late"]
    assert time.monotonic() - started >= 0.2
    assert len(queue) == 0


async def test_an_earlier_item_pushed_while_waiting_is_handed_out_first() -> None:
    queue: DelayQueue[str] = DelayQueue()
    queue.push("in an hour", 3600)
    waiter = asyncio.create_task(queue.next_due())
    await asyncio.sleep(0.01)
    queue.push("soon", 0.01)
    assert await asyncio.wait_for(waiter, 5) == ["soon"]
    assert queue.drain() == ["in an hour"]
    assert len(queue) == 0


async def test_everything_due_comes_out_in_one_batch_in_insertion_order() -> None:
    queue: DelayQueue[int] = DelayQueue()
    for i in range(5):
        queue.push(i, 0)
    assert await queue.next_due() == [0, 1, 2, 3, 4]
