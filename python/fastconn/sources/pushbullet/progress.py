"""The ``modified_after`` resume point and which pushes are settled (pure, no I/O).

Pushbullet orders pushes by the server's ``modified`` timestamp (float seconds), which several
pushes can share. The checkpoint is therefore a boundary ``(modified, idens)``: every push read
with a smaller ``modified`` is settled, and so are the listed ones *at* ``modified``. A restart
asks for pushes from ``modified`` on (inclusive) and drops the listed idens: pushes in flight at
the crash come again, settled ones do not.

A push counts as already handled (not new) when it was created before the boundary: an edited
or dismissed push reappears in a sync with a new ``modified`` and must not trigger again.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Boundary", "Progress", "Tracked"]


@dataclass(frozen=True, slots=True)
class Boundary:
    modified: float = 0.0
    idens: frozenset[str] = frozenset()

    def covers(self, created: float, iden: str) -> bool:
        """Whether a push created at ``created`` was settled before this boundary was saved."""
        return created < self.modified or (created == self.modified and iden in self.idens)

    @property
    def modified_after(self) -> float:
        """The ``modified_after`` to ask with: the API's comparison is strict, and pushes sharing
        the boundary's timestamp but not listed in it must come back."""
        return math.nextafter(self.modified, -math.inf) if self.modified > 0 else 0.0

    def encode(self) -> str:
        return json.dumps({"modified": self.modified, "idens": sorted(self.idens)})

    @classmethod
    def decode(cls, text: str) -> Boundary:
        """Raises ValueError on anything but a value :meth:`encode` wrote."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        modified, idens = data.get("modified"), data.get("idens", [])
        if not isinstance(modified, int | float) or isinstance(modified, bool) or not math.isfinite(modified):
            raise ValueError("modified is not a number")
        if not isinstance(idens, list) or not all(isinstance(i, str) for i in idens):
            raise ValueError("idens is not a list of strings")
        return cls(float(modified), frozenset(idens))


@dataclass(slots=True, eq=False)
class Tracked:
    """One push read from a sync, in ``modified`` order, until the boundary passes it."""

    iden: str
    modified: float
    done: bool = False
    payload: Any = field(default=None)
    """What the source keeps with it (its in-flight state)."""


class Progress:
    """Pushes read and not yet below the boundary, in the order read (ascending ``modified``)."""

    def __init__(self, boundary: Boundary) -> None:
        self.boundary = boundary
        self.saved = boundary
        self.read_through = boundary.modified
        """The largest ``modified`` read: the next sync asks from there (inclusive)."""
        self._queue: collections.deque[Tracked] = collections.deque()
        self._by_iden: dict[str, Tracked] = {}

    def is_new(self, iden: str, created: float) -> bool:
        """Neither tracked now nor settled before the boundary."""
        return iden not in self._by_iden and not self.boundary.covers(created, iden)

    def track(self, iden: str, modified: float, *, done: bool = False) -> Tracked:
        """A push read from a sync (called in ascending ``modified`` order)."""
        item = Tracked(iden, modified, done)
        self._queue.append(item)
        self._by_iden[iden] = item
        self.read_through = max(self.read_through, modified)
        return item

    def saw(self, modified: float) -> None:
        """A push read and not new: only the next sync's start moves."""
        self.read_through = max(self.read_through, modified)

    def settle(self, item: Tracked) -> bool:
        """``item`` is done; returns True when the boundary moved."""
        item.done = True
        moved = False
        queue = self._queue
        modified, idens = self.boundary.modified, set(self.boundary.idens)
        while queue and queue[0].done:
            head = queue.popleft()
            del self._by_iden[head.iden]
            if head.modified != modified:
                modified, idens = head.modified, set()
            idens.add(head.iden)
            moved = True
        if moved:
            self.boundary = Boundary(modified, frozenset(idens))
        return moved

    @property
    def outstanding(self) -> int:
        return len(self._queue)

    @property
    def unsaved(self) -> bool:
        return self.boundary != self.saved
