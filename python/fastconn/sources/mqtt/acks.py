"""Acknowledgements in arrival order: pure bookkeeping, tested without a broker.

MQTT requires a client to send PUBACKs (QoS 1) and PUBRECs (QoS 2) in the order the PUBLISHes
arrived (MQTT 5.0 §4.6, 3.1.1 §4.6): some brokers rely on it. fastconn finishes messages out of
order (many in flight, retries), so a finished message is acknowledged only once every message
that arrived before it on the same connection is finished too. Mosquitto itself accepts any
order, but fastconn keeps to the specification. The cost: one slow message holds back the
acknowledgements behind it, and with them the broker's window (receive maximum), which is the
intended backpressure.

A connection has its own window: packet identifiers belong to one network connection, and
after a reconnect the broker re-sends what was not acknowledged (so acknowledgements still
pending for an older connection are dropped, never sent on the new one).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["AckWindow", "Delivery"]


@dataclass(eq=False, slots=True)
class Delivery:
    """One QoS 1/2 PUBLISH as received on connection ``generation``."""

    mid: int
    qos: int
    generation: int
    done: bool = False


@dataclass(slots=True)
class AckWindow:
    """The unacknowledged deliveries of the current connection, in arrival order."""

    generation: int = 0
    _pending: deque[Delivery] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._pending)

    def received(self, mid: int, qos: int, generation: int) -> Delivery:
        """Tracks a delivery that arrived on connection ``generation``. One from an older
        connection is not tracked: it is never acknowledged (the broker sends it again)."""
        self.reconnected(generation)
        delivery = Delivery(mid, qos, generation)
        if generation == self.generation:
            self._pending.append(delivery)
        return delivery

    def reconnected(self, generation: int) -> None:
        """A new connection: what the older one did not acknowledge, the broker sends again."""
        if generation > self.generation:
            self.generation = generation
            self._pending.clear()

    def finished(self, delivery: Delivery) -> list[Delivery]:
        """Marks ``delivery`` finished; returns the deliveries to acknowledge now, in order
        (none when an earlier one is still running, or it belongs to an older connection)."""
        delivery.done = True
        if delivery.generation != self.generation:
            return []
        pending = self._pending
        ready: list[Delivery] = []
        while pending and pending[0].done:
            ready.append(pending.popleft())
        return ready
