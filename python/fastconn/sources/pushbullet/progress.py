"""The ``modified_after`` resume point and which pushes are settled (pure, no I/O).

Pushbullet orders pushes by the server's ``modified`` timestamp (float seconds), which several
pushes can share. The checkpoint is therefore a boundary ``(modified, idens)``: every push read
with a smaller ``modified`` is settled, and so are the listed ones *at* ``modified``. A restart
asks for pushes from ``modified`` on (inclusive) and drops the listed idens: pushes in flight at
the crash come again, settled ones do not.

The checkpoint also lists pushes settled *above* the boundary (up to :data:`MAX_SETTLED_AFTER`,
those behind one slow push): a restart skips them too, so it delivers again only the pushes that
were really in flight.

A push counts as already handled (not new) when it was created before the boundary: an edited
or dismissed push reappears in a sync with a new ``modified`` and must not trigger again.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MAX_SETTLED_AFTER", "Boundary", "Progress", "Tracked"]

MAX_SETTLED_AFTER: Final = 1000
"""Settled idens above the boundary kept in the checkpoint; beyond it they would be delivered
again after a crash (duplicates, never losses) rather than grow the saved value."""


@dataclass(frozen=True, slots=True)
class Boundary:
    modified: float = 0.0
    idens: frozenset[str] = frozenset()
    settled_after: frozenset[str] = frozenset()
    """Pushes above ``modified`` already settled (skipped when read again after a restart)."""

    def covers(self, created: float, iden: str) -> bool:
        """Whether a push created at ``created`` was settled before this boundary was saved."""
        if created < self.modified or iden in self.settled_after:
            return True
        return created == self.modified and iden in self.idens

    @property
    def modified_after(self) -> float:
        """The ``modified_after`` to ask with: the API's comparison is strict, and pushes sharing
        the boundary's timestamp but not listed in it must come back."""
        return math.nextafter(self.modified, -math.inf) if self.modified > 0 else 0.0

    def encode(self) -> str:
        value: dict[str, Any] = {"modified": self.modified, "idens": sorted(self.idens)}
        if self.settled_after:
            value["settled_after"] = sorted(self.settled_after)
        return json.dumps(value)

    @classmethod
    def decode(cls, text: str) -> Boundary:
        """Raises ValueError on anything but a value :meth:`encode` wrote."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        modified = data.get("modified")
        if not isinstance(modified, int | float) or isinstance(modified, bool) or not math.isfinite(modified):
            raise ValueError("modified is not a number")
        lists = []
        for key in ("idens", "settled_after"):
            idens = data.get(key, [])
            if not isinstance(idens, list) or not all(isinstance(i, str) for i in idens):
                raise ValueError(f"{key} is not a list of strings")
            lists.append(frozenset(idens))
        return cls(float(modified), lists[0], lists[1])


@dataclass(slots=True, eq=False)
class Tracked:
    """One push read from a sync, in ``modified`` order, until the boundary passes it."""

    iden: str
    modified: float
    done: bool = False


class Progress:
    """Pushes read and not yet below the boundary, in the order read (ascending ``modified``)."""

    def __init__(self, boundary: Boundary) -> None:
        self.boundary = boundary
        self.saved = boundary
        self.read_through = boundary.modified
        """The largest ``modified`` read: the next sync asks from there (inclusive)."""
        self._queue: collections.deque[Tracked] = collections.deque()
        self._by_iden: dict[str, Tracked] = {}
        self._settled_after: set[str] = set()
        self._carried = set(boundary.settled_after)
        """Settled above the boundary before a restart and not read again yet."""

    def read(self, iden: str, created: float, modified: float) -> Tracked | None:
        """A push read from a sync (in ascending ``modified`` order): tracked when new, None when
        it is tracked already or was settled before."""
        if iden in self._carried:
            # Settled before the restart, above the boundary: tracked as done, so the boundary
            # passes it in order.
            self._carried.discard(iden)
            self.settle(self.track(iden, modified))
            return None
        if iden in self._by_iden or self.boundary.covers(created, iden):
            self.read_through = max(self.read_through, modified)
            return None
        return self.track(iden, modified)

    def track(self, iden: str, modified: float) -> Tracked:
        item = Tracked(iden, modified)
        self._queue.append(item)
        self._by_iden[iden] = item
        self.read_through = max(self.read_through, modified)
        return item

    def settle(self, item: Tracked) -> None:
        """``item`` is done: the boundary moves past the settled prefix; settled pushes behind
        an unsettled one are listed in it (up to :data:`MAX_SETTLED_AFTER`)."""
        if item.done:
            return
        item.done = True
        self._settled_after.add(item.iden)
        queue = self._queue
        modified, idens = self.boundary.modified, set(self.boundary.idens)
        while queue and queue[0].done:
            head = queue.popleft()
            del self._by_iden[head.iden]
            self._settled_after.discard(head.iden)
            if head.modified != modified:
                modified, idens = head.modified, set()
            idens.add(head.iden)
        after = self._settled_after | self._carried
        if len(after) > MAX_SETTLED_AFTER:
            after = set(sorted(after)[:MAX_SETTLED_AFTER])
        self.boundary = Boundary(modified, frozenset(idens), frozenset(after))

    @property
    def outstanding(self) -> int:
        return len(self._queue)

    @property
    def unsaved(self) -> bool:
        return self.boundary != self.saved
