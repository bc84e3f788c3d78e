"""Items that become due after a delay, handed out in batches: the in-place retries of the
sources that redeliver themselves (a message whose key is held waits here, not in the broker)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Generic, TypeVar

__all__ = ["DelayQueue"]

T = TypeVar("T")


class DelayQueue(Generic[T]):
    """A min-heap on due time; :meth:`next_due` waits for the earliest and returns everything
    due by then (one submit per batch, not per item). Equal due times keep insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + max(delay, 0.0), next(self._order), item))
        self._changed.set()  # an earlier item may now be first: the waiter looks again

    async def next_due(self) -> list[T]:
        """Waits until at least one item is due; returns all due items, earliest first."""
        while True:
            self._changed.clear()
            if not self._heap:
                await self._changed.wait()
                continue
            wait = self._heap[0][0] - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
                continue
            now = time.monotonic()
            due: list[T] = []
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap)[2])
            return due

    def drain(self) -> list[T]:
        """Every waiting item, due or not (at shutdown), earliest first; the queue is empty after."""
        items = [item for _, _, item in sorted(self._heap)]
        self._heap.clear()
        return items
