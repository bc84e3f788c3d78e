"""What is settled, and the checkpoint that says so.

Events are read in key order and settle in any order (many in flight, retries). The checkpoint
is the watermark of :mod:`fastconn.watermark` over event keys: the highest key such that it and
every event read before it are settled (delivered, unrouted or dead-lettered). A restart resumes
after it, so nothing is skipped; events above it that had settled are delivered again (at least
once; ``X-Message-Id`` is the same, so a function can drop them).

Stored as one JSON string: ``{"instance": <vCenter instanceUuid>, "key": <event key>, "time":
<its createdTime>}``. The time bounds the catch-up read after a restart. ``key = 0`` means "the
server's keys restarted (or nothing was read yet): every event created after ``time`` is new".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from fastconn.errors import SourceError
from fastconn.watermark import Watermark

__all__ = ["Cursor", "Progress"]


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in one vCenter's event history."""

    instance: str
    key: int
    time: datetime | None

    def encode(self) -> str:
        when = self.time.isoformat() if self.time is not None else None
        return json.dumps({"instance": self.instance, "key": self.key, "time": when})

    @classmethod
    def decode(cls, text: str, where: str) -> Cursor:
        try:
            data = json.loads(text)
            time = data.get("time")
            return cls(
                str(data["instance"]),
                int(data["key"]),
                datetime.fromisoformat(time) if time is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(
                f"{where}: the checkpoint {text[:200]!r} is not a vcenter checkpoint ({exc!r}): "
                "remove it (the source then starts at the newest event) or restore the right one"
            ) from None


class Progress:
    """The watermark over the keys read from one vCenter since the last (re)start of reading."""

    def __init__(self, start: Cursor) -> None:
        self.start = start
        self._mark = Watermark()
        self._times: dict[int, datetime] = {}
        self._last_settled = start

    def track(self, key: int, created: datetime) -> None:
        """Event ``key`` was read and is now in flight (keys ascending)."""
        self._mark.track(key)
        self._times[key] = created

    def settle(self, key: int) -> bool:
        """Event ``key`` is done for good; True when the checkpoint moved."""
        if not self._mark.complete(key):
            return False
        through = self._mark.done_through
        if through is None or through <= self._last_settled.key:
            return False
        self._last_settled = Cursor(self.start.instance, through, self._times.get(through))
        for key_done in [k for k in self._times if k <= through]:
            del self._times[key_done]
        return True

    @property
    def checkpoint(self) -> Cursor:
        """Where a restart resumes: after the last key below which everything settled."""
        return self._last_settled

    @property
    def outstanding(self) -> int:
        """Events read and not below the watermark (what a restart would deliver again)."""
        return self._mark.outstanding

    @property
    def in_flight(self) -> int:
        return self._mark.in_flight
