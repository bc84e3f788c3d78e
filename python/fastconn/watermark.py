"""Gap-free completion watermarks for sources that acknowledge by position in an ordered log.

Kafka commits one offset per partition, Postgres logical replication confirms one LSN per slot:
both mean "everything before this position is processed". fastconn completes messages out of
order (many in flight, per-key ordering, retries), so a source may only commit the position
below which *every* message is done. :class:`Watermark` tracks that for one log;
:class:`Watermarks` keeps one per partition.

Positions must be tracked in increasing order (the order the log delivers them); they need not
be contiguous (compacted topics and transaction markers leave gaps, LSNs jump). Both the Kafka
convention (commit the *next* position to read: :attr:`Watermark.committable`) and the WAL one
(confirm the *last* processed position: :attr:`Watermark.done_through`) are offered.

Cost: O(1) amortised per tracked position; memory is one int per position between the
watermark and the newest tracked one, which :attr:`Watermark.outstanding` exposes so a source can
bound it (pause fetching) when one slow message holds the watermark back.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["Watermark", "Watermarks"]

K = TypeVar("K", bound=Hashable)


class Watermark:
    """Completion tracking for one ordered log (a Kafka partition, a replication slot)."""

    __slots__ = ("_committed", "_done_through", "_last", "_pending", "_unfinished")

    def __init__(self, committed: int | None = None) -> None:
        self._pending: collections.deque[int] = collections.deque()
        """Tracked positions at or above the watermark, ascending (done or not)."""
        self._unfinished: set[int] = set()
        """The subset of ``_pending`` not done yet."""
        self._last: int | None = None
        """The newest tracked position."""
        self._done_through: int | None = None
        self._committed = committed

    # -- feeding ---------------------------------------------------------------------------

    def track(self, position: int) -> None:
        """A message at ``position`` was taken from the log and is now in flight.

        Raises :class:`ValueError` unless ``position`` is above every tracked position: a log
        never goes back, and a source that re-reads (after a seek) must start a new watermark.
        """
        if self._last is not None and position <= self._last:
            raise ValueError(f"position {position} is not above the last tracked one ({self._last})")
        self._last = position
        self._pending.append(position)
        self._unfinished.add(position)

    def complete(self, position: int) -> bool:
        """The message at ``position`` is done. Returns True when the watermark moved.

        Completing an unknown or already completed position does nothing (returns False), so a
        late duplicate completion cannot corrupt the state.
        """
        unfinished = self._unfinished
        if position not in unfinished:
            return False
        unfinished.discard(position)
        pending = self._pending
        if pending[0] != position:
            return False
        while pending and pending[0] not in unfinished:
            self._done_through = pending.popleft()
        return True

    # -- reading ---------------------------------------------------------------------------

    @property
    def committable(self) -> int | None:
        """The position to commit, Kafka style: the lowest position not done yet, or one past
        the newest tracked position when all are done. ``None`` before anything was tracked
        (nothing is known about this log, so nothing may be committed)."""
        if self._pending:
            return self._pending[0]
        return None if self._last is None else self._last + 1

    @property
    def done_through(self) -> int | None:
        """The highest position such that it and every tracked position before it are done
        (WAL style: the LSN to confirm). ``None`` when no prefix is done yet."""
        return self._done_through

    @property
    def outstanding(self) -> int:
        """Tracked positions not yet below the watermark, done or not: what a restart would
        redeliver, and what a source bounds to keep one stuck message from growing memory."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Tracked positions not done yet."""
        return len(self._unfinished)

    @property
    def last_tracked(self) -> int | None:
        return self._last

    def unfinished(self) -> list[int]:
        """The positions not done yet, ascending."""
        return sorted(self._unfinished)

    # -- committing ------------------------------------------------------------------------

    @property
    def committed(self) -> int | None:
        """The last position reported committed with :meth:`mark_committed` (or given at
        construction)."""
        return self._committed

    def to_commit(self) -> int | None:
        """:attr:`committable` when it is ahead of :attr:`committed`, else ``None``."""
        position = self.committable
        if position is None or (self._committed is not None and position <= self._committed):
            return None
        return position

    def mark_committed(self, position: int) -> None:
        """Records a successful commit of ``position`` (never moves backwards)."""
        if self._committed is None or position > self._committed:
            self._committed = position

    def __repr__(self) -> str:
        return (
            f"Watermark(committable={self.committable}, committed={self._committed}, "
            f"outstanding={self.outstanding}, in_flight={self.in_flight})"
        )


class Watermarks(Generic[K]):
    """One :class:`Watermark` per partition (any hashable key, e.g. a ``TopicPartition``)."""

    def __init__(self) -> None:
        self._marks: dict[K, Watermark] = {}

    def get(self, partition: K) -> Watermark:
        """The partition's watermark, created empty on first use."""
        mark = self._marks.get(partition)
        if mark is None:
            mark = self._marks[partition] = Watermark()
        return mark

    def track(self, partition: K, position: int) -> None:
        self.get(partition).track(position)

    def complete(self, partition: K, position: int) -> bool:
        mark = self._marks.get(partition)
        return mark.complete(position) if mark is not None else False

    def committable(self, partition: K) -> int | None:
        mark = self._marks.get(partition)
        return mark.committable if mark is not None else None

    def to_commit(self) -> dict[K, int]:
        """Every partition whose watermark moved past its last commit, with the position."""
        out: dict[K, int] = {}
        for partition, mark in self._marks.items():
            position = mark.to_commit()
            if position is not None:
                out[partition] = position
        return out

    def mark_committed(self, positions: dict[K, int]) -> None:
        for partition, position in positions.items():
            mark = self._marks.get(partition)
            if mark is not None:
                mark.mark_committed(position)

    def remove(self, partition: K) -> Watermark | None:
        """Forgets a partition (revoked, closed); returns its last state."""
        return self._marks.pop(partition, None)

    def __contains__(self, partition: object) -> bool:
        return partition in self._marks

    def __iter__(self) -> Iterator[K]:
        return iter(self._marks)

    def __len__(self) -> int:
        return len(self._marks)

    def items(self) -> Iterator[tuple[K, Watermark]]:
        return iter(self._marks.items())
