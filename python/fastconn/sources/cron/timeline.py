"""Which function fires next, and which slots a restart missed: the scheduler without I/O.

:class:`Timeline` holds one pending slot per scheduled function in a heap ordered by the time
it is due (the slot plus the function's jitter). Replacing or removing a function bumps its
generation, so stale heap entries are skipped instead of searched for. Everything takes the
time as an argument: tests drive it with any clock.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastconn.sources.cron.schedule import Schedule

__all__ = ["CatchUp", "Due", "Timeline", "catch_up_slots"]

CatchUp = Literal["none", "last", "all"]


def catch_up_slots(
    schedule: Schedule, last_fired: float | None, now: float, policy: CatchUp, max_catch_up: int
) -> list[float]:
    """The slots in ``(last_fired, now]`` to fire late, oldest first.

    ``none`` (or nothing fired before: a new function has missed nothing): none; ``last``: the
    newest missed slot; ``all``: the newest ``max_catch_up`` missed slots.
    """
    if policy == "none" or last_fired is None:
        return []
    limit = 1 if policy == "last" else max_catch_up
    return schedule.recent(last_fired, now, limit)


@dataclass(frozen=True, slots=True)
class Due:
    function: str
    slot: float
    due_at: float
    """The slot plus the jitter drawn for it."""


class Timeline:
    """The next slot of every scheduled function. ``jitter(function)`` is the largest delay in
    seconds added to that function's fire times (0 = fire on the slot)."""

    def __init__(self, jitter: Callable[[str], float], rng: random.Random | None = None) -> None:
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, str, float]] = []
        self._schedules: dict[str, tuple[Schedule, int]] = {}
        self._generation = 0

    def __contains__(self, function: str) -> bool:
        return function in self._schedules

    def __len__(self) -> int:
        return len(self._schedules)

    @property
    def functions(self) -> frozenset[str]:
        return frozenset(self._schedules)

    def schedule_of(self, function: str) -> Schedule | None:
        entry = self._schedules.get(function)
        return entry[0] if entry else None

    def put(self, function: str, schedule: Schedule, after: float) -> None:
        """Schedule ``function`` from its first slot after ``after`` (replacing any earlier entry)."""
        self._generation += 1
        self._schedules[function] = (schedule, self._generation)
        self._push(function, schedule, self._generation, schedule.next_after(after))

    def remove(self, function: str) -> None:
        self._schedules.pop(function, None)

    def next_due(self) -> float | None:
        """When the earliest pending slot is due; None when nothing is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Due]:
        """Every slot due at ``now``, each function advanced to its following slot."""
        due: list[Due] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            due_at, generation, function, slot = heapq.heappop(self._heap)
            schedule = self._schedules[function][0]
            due.append(Due(function, slot, due_at))
            # From the slot, not from now: a late wake-up must not skip or double a slot.
            self._push(function, schedule, generation, schedule.next_after(slot))

    def _push(self, function: str, schedule: Schedule, generation: int, slot: float) -> None:
        jitter = self._jitter(function)
        due_at = slot + (self._rng.uniform(0.0, jitter) if jitter > 0 else 0.0)
        heapq.heappush(self._heap, (due_at, generation, function, slot))

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            _, generation, function, _ = heap[0]
            current = self._schedules.get(function)
            if current is not None and current[1] == generation:
                return
            heapq.heappop(heap)
