"""What the WAL source remembers between reading a transaction and confirming it: pure state,
tested without a server.

Transactions are tracked in a :class:`fastconn.watermark.Watermark` by a sequence number in
commit order (their LSNs are what gets confirmed, but the watermark needs dense increasing
positions); a transaction is done when every one of its changes is done (delivered, unrouted,
filtered out or dead-lettered). :meth:`Pending.confirmable` gives the end LSN of the newest
transaction below which everything is done: the slot may be advanced to it, never further.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from fastconn.message import Message
from fastconn.sources.postgres.changes import Change, Transaction
from fastconn.watermark import Watermark

__all__ = ["InFlight", "Pending", "TxnState"]


@dataclasses.dataclass(eq=False, slots=True)
class TxnState:
    seq: int
    end_lsn: int
    rows: int
    """Peek rows it took (to size the next peek, which starts again at the confirmed position)."""
    changes: int
    remaining: int
    read_at: float


@dataclasses.dataclass(eq=False, slots=True)
class InFlight:
    """One change handed to the dispatcher (``Message.handle``)."""

    txn: TxnState
    change: Change
    message: Message
    deliveries: int = 1
    held: bool = False
    stuck: bool = False


class Pending:
    """The transactions read and not yet confirmed, in commit order."""

    def __init__(self) -> None:
        self.mark = Watermark()
        self._seq = 0
        self._txns: collections.deque[TxnState] = collections.deque()
        self.read_through: int | None = None
        """Commit LSN of the newest transaction read (a re-peek skips up to it)."""
        self.rows = 0
        """Peek rows of the transactions not yet confirmed."""
        self.changes = 0
        """Changes of the transactions not yet confirmed (memory bound)."""
        self.confirmed: int | None = None

    def add(self, txn: Transaction, rows: int, deliver: int) -> TxnState:
        """A transaction read from the slot, of which ``deliver`` changes go to functions."""
        self._seq += 1
        state = TxnState(self._seq, txn.end_lsn, rows, len(txn.changes), deliver, time.monotonic())
        self.mark.track(state.seq)
        self._txns.append(state)
        self.read_through = txn.commit_lsn
        self.rows += rows
        self.changes += len(txn.changes)
        if deliver == 0:
            self.mark.complete(state.seq)
        return state

    def change_done(self, txn: TxnState) -> None:
        txn.remaining -= 1
        if txn.remaining == 0:
            self.mark.complete(txn.seq)

    def confirmable(self) -> int | None:
        """The end LSN to confirm now, when it is past the last confirmed one."""
        done = self.mark.done_through
        if done is None or not self._txns or self._txns[0].seq > done:
            return None
        end = self._txns[0].end_lsn
        for txn in self._txns:
            if txn.seq > done:
                break
            end = txn.end_lsn
        return end

    def confirmed_through(self, lsn: int) -> None:
        """The slot was advanced to ``lsn``: forget the transactions ending at or before it."""
        while (
            self._txns and self._txns[0].end_lsn <= lsn and self._txns[0].seq <= (self.mark.done_through or 0)
        ):
            txn = self._txns.popleft()
            self.rows -= txn.rows
            self.changes -= txn.changes
        self.confirmed = lsn if self.confirmed is None else max(self.confirmed, lsn)

    @property
    def outstanding(self) -> int:
        """Transactions read and not yet confirmed."""
        return len(self._txns)

    def oldest_age(self) -> float:
        """Seconds since the oldest unconfirmed transaction was read (0 when none)."""
        return time.monotonic() - self._txns[0].read_at if self._txns else 0.0
