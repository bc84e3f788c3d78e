"""This replica's claims in a durable store, between claim and done (see :mod:`.store`).

:class:`Leases` knows which fires are running (their leases are renewed) and which settled and
still owe the store their done marker. A done marker preferably rides on the function's next
claim (one write instead of two); one whose function is not claimed again within
``DONE_DELAY`` is written on its own. Until a fire is marked done, a crash of this replica
means another one takes its claim over once the lease expires and fires the slot again: at
least once per slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

from fastconn.sources.cron.store import SlotStore

__all__ = ["DONE_DELAY", "Leases"]

log = logging.getLogger("fastconn.source.cron")

DONE_DELAY: Final = 2.0
"""How long a settled fire waits for its function's next claim to carry its done marker before
it is written on its own: schedules of up to ~2 s then write once per fire. A crash in between
re-fires that slot (at least once), so it stays short."""


class Leases:
    """``store_failed(n)`` counts store failures; ``describe(slot)`` formats a slot for logs."""

    def __init__(
        self,
        store: SlotStore,
        source: str,
        store_failed: Callable[[int], None],
        describe: Callable[[float], str],
    ) -> None:
        self._store = store
        self._source = source
        self._store_failed = store_failed
        self._describe = describe
        self._running: dict[str, tuple[str, float]] = {}
        """Fires dispatched and not settled: message id → (function, slot)."""
        self._settled: dict[str, list[float]] = {}
        """Settled fires not yet marked done in the store, per function."""
        self._settled_since: dict[str, float] = {}
        """When the oldest of a function's settled fires settled (monotonic)."""

    def started(self, message_id: str, function: str, slot: float) -> None:
        self._running[message_id] = (function, slot)

    def settled(self, message_id: str) -> None:
        claim = self._running.pop(message_id, None)
        if claim is not None:
            self._owe(claim[0], [claim[1]])

    def take_done(self, function: str) -> tuple[float, ...]:
        """The settled slots of ``function`` for its next claim to mark done."""
        self._settled_since.pop(function, None)
        return tuple(self._settled.pop(function, ()))

    def give_back(self, function: str, slots: Sequence[float]) -> None:
        """Slots of :meth:`take_done` whose claim failed: still owed."""
        if slots:
            self._owe(function, list(slots))

    def _owe(self, function: str, slots: list[float]) -> None:
        self._settled.setdefault(function, []).extend(slots)
        self._settled_since.setdefault(function, time.monotonic())

    async def mark_done_loop(self) -> None:
        """Writes the done markers no claim carried within ``DONE_DELAY``."""
        while True:
            await asyncio.sleep(DONE_DELAY / 4)
            await self.flush_done(older_than=DONE_DELAY)

    async def flush_done(self, older_than: float = 0.0) -> None:
        """Writes the done markers of fires settled at least ``older_than`` seconds ago."""
        cutoff = time.monotonic() - older_than
        due = [f for f, since in self._settled_since.items() if since <= cutoff]
        settled = {f: self.take_done(f) for f in due}
        if not settled:
            return
        functions = list(settled)
        results = await asyncio.gather(
            *(self._store.done(f, settled[f]) for f in functions), return_exceptions=True
        )
        failed = [(f, r) for f, r in zip(functions, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            # Kept owed: retried on the next round; if this replica dies first, another one
            # takes the claims over when their lease expires and fires the slots again (same id).
            for function, _ in failed:
                self.give_back(function, settled[function])
            self._store_failed(len(failed))
            log.warning(
                "source %s: fires of %d function(s) not marked done: the store failed (%r); retrying",
                self._source,
                len(failed),
                failed[0][1],
            )

    async def renew(self, now: float) -> None:
        """Extends the leases of the running fires."""
        by_function: dict[str, list[float]] = {}
        for function, slot in self._running.values():
            by_function.setdefault(function, []).append(slot)
        if not by_function:
            return
        functions = list(by_function)
        results = await asyncio.gather(
            *(self._store.renew(f, tuple(by_function[f]), now) for f in functions), return_exceptions=True
        )
        for function, result in zip(functions, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("source %s: lease of %s not renewed: %r", self._source, function, result)
            elif result:
                log.warning(
                    "source %s: %s lost the lease of slot(s) %s to another replica (this one stalled "
                    "for longer than the lease): they may fire twice",
                    self._source,
                    function,
                    ", ".join(self._describe(s) for s in result),
                )
