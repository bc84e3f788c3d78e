"""Key order after a crash: the restart gate.

A daemon killed mid-stream leaves messages delivered and unacknowledged on the durable
consumer. The server redelivers each only when its ``ack_wait`` runs out, and not all at once
(each one's timer started at its own last in-progress ack), while messages never delivered
are served at once. Dispatching as they arrive would run newer messages of a key before the
older ones still out with the dead process, and the old ones among themselves out of order.

So at start, when the consumer reports unacknowledged messages, the source holds everything
it receives until each of them came back (or the gate's deadline passes), then dispatches what
it holds in stream order. Pure state; the source feeds it and keeps the held messages alive
with in-progress acks.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["RestartGate"]

T = TypeVar("T")


class RestartGate(Generic[T]):
    """Holds deliveries until the ``pending`` messages up to stream sequence
    ``last_delivered`` (the consumer's state at start) have all been received again."""

    def __init__(self, *, pending: int, last_delivered: int, now: float, ack_wait: float) -> None:
        self.pending = pending
        self.remaining = pending
        """Unacknowledged messages of the dead process not received yet."""
        self._last_delivered = last_delivered
        self._seen: set[int] = set()
        self._held: list[tuple[int, T]] = []
        self.started = now
        # Every unacknowledged message expires at most ack_wait after the start (its last
        # in-progress ack was before the crash); the server's redelivery timer may lag behind
        # a little, hence the grace.
        self.deadline = now + ack_wait + max(1.0, ack_wait / 2)

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, seq: int, item: T) -> None:
        """Keeps one delivery (stream sequence ``seq``) until :meth:`release`."""
        if seq <= self._last_delivered and seq not in self._seen:
            self._seen.add(seq)
            self.remaining -= 1
        self._held.append((seq, item))

    def ready(self, now: float) -> bool:
        """Whether everything may go: all came back, or the deadline passed."""
        return self.remaining <= 0 or now >= self.deadline

    def release(self) -> list[T]:
        """Everything held, in stream order (which is each key's order)."""
        held, self._held = self._held, []
        held.sort(key=lambda pair: pair[0])
        return [item for _, item in held]
