"""The continuous pull's bookkeeping: which pull requests are open and how many messages they
may still bring. Pure state (the caller passes the clock), so it is tested without a server."""

from __future__ import annotations

from collections import deque
from typing import Final

__all__ = ["PullWindow", "pull_room"]

_LATE_408: Final = 2.0
"""Seconds past its expiry after which a pull request's 408 is taken as lost."""


class PullWindow:
    """Open pull requests, oldest first, and the messages they may still deliver.

    The server answers a request with messages, then ends it with a status (408 when it
    expires unfilled, 409 when it is cut short); heartbeats show the requests are alive."""

    def __init__(self, now: float, *, silence: float) -> None:
        self._pulls: deque[list[float]] = deque()
        """[expires_at, messages still to come] per open request."""
        self.requested = 0
        """Messages asked for and not yet delivered, over all open requests."""
        self.last_activity = now
        self._silence = silence

    def __len__(self) -> int:
        return len(self._pulls)

    def opened(self, n: int, now: float, expires: float) -> None:
        """A request for ``n`` messages was sent, open until ``now + expires``."""
        if not self._pulls:
            self.last_activity = now
        self._pulls.append([now + expires, float(n)])
        self.requested += n

    def heard(self, now: float) -> None:
        """Anything arrived on the inbox (a message, a heartbeat, a status)."""
        self.last_activity = now

    def delivered(self) -> None:
        """One message of the oldest open request arrived."""
        pulls = self._pulls
        if pulls:
            pulls[0][1] -= 1
            if pulls[0][1] <= 0:
                pulls.popleft()
            self.requested -= 1

    def ended(self) -> None:
        """The oldest open request ended (408/409) with its remaining count unsent."""
        if self._pulls:
            self.requested -= int(self._pulls.popleft()[1])
        self.requested = max(self.requested, 0)

    def expire(self, now: float) -> bool:
        """Drops requests whose end never came. True when the open requests went silent (no
        heartbeat for ``silence`` seconds): they are gone, the caller should :meth:`reset`."""
        pulls = self._pulls
        while pulls and pulls[0][0] + _LATE_408 < now:
            self.requested -= int(pulls.popleft()[1])
        silent = self.requested > 0 and now - self.last_activity > self._silence
        if not pulls:
            self.requested = 0
        return silent

    def reset(self, now: float) -> None:
        """Forgets every open request (after a reconnect, or silence): ask again."""
        self._pulls.clear()
        self.requested = 0
        self.last_activity = now


def pull_room(
    *, window: int, capacity: int, queued: int, inflight: int, buffered: int, requested: int
) -> int:
    """Messages to ask for now: our share of ``window`` (``max_ack_pending`` bounded by the
    dispatcher's capacity) not yet in flight or asked for, and no more than the dispatcher has
    free once what is buffered and asked for arrives."""
    mine = window - inflight - requested
    free = capacity - queued - buffered - requested
    return max(0, min(mine, free))
