"""Which acknowledgements to send on one channel. Pure, tested without a broker.

A ``multiple`` ack at tag T acknowledges every unacknowledged delivery up to T, so T must stay
below every delivery still running, retrying or being moved to another queue, and T itself
must be unacknowledged still (the broker refuses an unknown tag and closes the channel).
Acking per message, or per batch of outcomes (a few messages each), cost a frame and a socket
write each, a large part of the source's work per message. Calls finish out of order, so
most settled tags sit above one still running: they wait until the oldest delivery settles,
and a ``multiple`` ack covers them all once ``batch`` of them are due, or when the source
asks for what is :meth:`overdue` (every few milliseconds). Only a tag that has waited
``linger`` seconds (behind a slow call, or one kept for an in-place retry) is acknowledged
alone, so the broker's prefetch window does not fill up with settled messages."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

__all__ = ["AckWindow"]


class AckWindow:
    """The delivery tags of one channel that are not acknowledged yet."""

    def __init__(self, linger: float = 0.05, batch: int = 1) -> None:
        self.linger = linger
        self.batch = batch
        self._open: list[int] = []
        """Delivered tags, a heap; trimmed from the bottom once settled."""
        self._settled: set[int] = set()
        """Tags in ``_open`` that are settled (acknowledged, waiting, or handed back)."""
        self._waiting: dict[int, float] = {}
        """Settled tags not acknowledged yet, and when they settled (oldest first)."""
        self._upto: int | None = None
        """The highest waiting tag the trimmed prefix reached: due for a ``multiple`` ack."""
        self._covered = 0
        """Waiting tags that ack would acknowledge."""

    def __len__(self) -> int:
        """Deliveries not settled yet."""
        return len(self._open) - len(self._settled)

    @property
    def pending(self) -> bool:
        """Acknowledgements are still to be handed out (by :meth:`settle` or :meth:`overdue`)."""
        return bool(self._waiting) or self._upto is not None

    def delivered(self, tag: int) -> None:
        heapq.heappush(self._open, tag)

    def forget(self, tags: Iterable[int]) -> None:
        """Tags settled without an ack from here: call it once their nack is sent (a
        ``multiple`` ack this makes possible, handed out by the next :meth:`settle` or
        :meth:`overdue`, must not reach the broker before it)."""
        self._settled.update(tags)
        self._trim()

    def settle(self, tags: Iterable[int], now: float) -> int | None:
        """Marks ``tags`` settled (to acknowledge); returns the tag to ack with ``multiple``
        once it covers ``batch`` tags (None: not yet)."""
        for tag in tags:
            self._settled.add(tag)
            self._waiting[tag] = now
        self._trim()
        return self._hand_out() if self._covered >= self.batch else None

    def overdue(self, now: float) -> tuple[int | None, list[int]]:
        """The ``multiple`` ack due, however few it covers (None: none), and the tags that
        waited ``linger`` or longer for one, to acknowledge one by one."""
        singles = []
        for tag, since in self._waiting.items():
            if now - since < self.linger:
                break
            singles.append(tag)
        for tag in singles:
            del self._waiting[tag]
        return self._hand_out(), singles

    def _hand_out(self) -> int | None:
        upto, self._upto, self._covered = self._upto, None, 0
        return upto

    def _trim(self) -> None:
        heap, settled, waiting = self._open, self._settled, self._waiting
        while heap and heap[0] in settled:
            tag = heapq.heappop(heap)
            settled.discard(tag)
            if waiting.pop(tag, None) is not None:
                self._upto = tag
                self._covered += 1
