"""Which acknowledgements to send on one channel: one ``multiple`` ack for every settled tag
below the oldest unsettled one, single acks for the rest. Pure, tested without a broker.

A ``multiple`` ack at tag T acknowledges every unacknowledged delivery up to T, so T must stay
below every delivery still running, retrying or being moved to another queue; acks per message
would cost the broker (and this process) one frame each."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

__all__ = ["AckWindow"]


class AckWindow:
    """The delivery tags of one channel that are not settled yet."""

    def __init__(self) -> None:
        self._open: list[int] = []
        self._settled: set[int] = set()

    def __len__(self) -> int:
        return len(self._open) - len(self._settled)

    def delivered(self, tag: int) -> None:
        heapq.heappush(self._open, tag)

    def forget(self, tags: Iterable[int]) -> None:
        """Tags settled without an ack from here (handed back to the broker)."""
        self._settled.update(tags)
        self._trim()

    def settle(self, tags: Iterable[int]) -> tuple[int | None, list[int]]:
        """Marks ``tags`` settled; returns the tag to ack with ``multiple`` (None: none) and the
        tags to ack one by one (those above a delivery still unsettled)."""
        done = list(tags)
        self._settled.update(done)
        self._trim()
        oldest = self._open[0] if self._open else None
        below = [t for t in done if oldest is None or t < oldest]
        above = [t for t in done if oldest is not None and t >= oldest]
        return (max(below) if below else None), above

    def _trim(self) -> None:
        heap, settled = self._open, self._settled
        while heap and heap[0] in settled:
            settled.discard(heapq.heappop(heap))
