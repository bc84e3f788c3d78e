"""Deletes and visibility changes in batches of up to ten (``DeleteMessageBatch``,
``ChangeMessageVisibilityBatch``), several batches in flight at once.

A batch call answers 200 even when some entries failed: each failed entry is read from
``Failed``. A failure on SQS's side (not ``SenderFault``) and a failed call are tried again
a few times; a sender fault (an expired or stale receipt handle: the message was received
again elsewhere) is final. Whatever is not deleted becomes visible again when its visibility
timeout ends and is delivered again: a duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastconn.backoff import doubling
from fastconn.ratelimit import RateLimitedLog

__all__ = ["BatchCalls"]

_BATCH: Final = 10
_ATTEMPTS: Final = 5

Op = Literal["delete", "visibility"]


@dataclass(slots=True)
class _Entry:
    receipt: str
    seconds: int
    attempt: int = 1


class BatchCalls:
    """Collects deletes and visibility changes per queue and sends them in batches."""

    def __init__(
        self,
        client: Any,
        source: str,
        log: logging.Logger,
        count_error: Callable[[str, int], None],
        concurrency: int = 16,
    ) -> None:
        self._client = client
        self._source = source
        self._log = RateLimitedLog(log)
        self._count_error = count_error
        self._pending: dict[tuple[Op, str], list[_Entry]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._calls: set[asyncio.Task[None]] = set()
        self._retrying = 0
        """Entries waiting out a retry delay: not pending yet, but not done either."""
        self.deleted = 0

    def delete(self, queue_url: str, receipt: str) -> None:
        self._add("delete", queue_url, _Entry(receipt, 0))

    def change_visibility(self, queue_url: str, receipt: str, seconds: float) -> None:
        self._add("visibility", queue_url, _Entry(receipt, max(0, min(43_200, round(seconds)))))

    @property
    def idle(self) -> bool:
        return not self._pending and not self._calls and not self._retrying

    async def run(self) -> None:
        """Sends what is pending until cancelled (then :meth:`flush` sends the rest)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_pending()

    async def flush(self, timeout: float) -> None:
        """Sends everything pending and waits (bounded) for the calls to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.idle and loop.time() < deadline:
            await self._send_pending()
            if self._calls:
                await asyncio.wait(set(self._calls), timeout=max(0.0, deadline - loop.time()))
            elif self._retrying:
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))  # a retry's delay

    def _add(self, op: Op, queue_url: str, entry: _Entry) -> None:
        self._pending.setdefault((op, queue_url), []).append(entry)
        self._wake.set()

    async def _send_pending(self) -> None:
        while self._pending:
            (op, url), entries = next(iter(self._pending.items()))
            batch, rest = entries[:_BATCH], entries[_BATCH:]
            if rest:
                self._pending[(op, url)] = rest
            else:
                del self._pending[(op, url)]
            await self._slots.acquire()
            task = asyncio.create_task(self._call(op, url, batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, op: Op, url: str, batch: list[_Entry]) -> None:
        try:
            ids = {str(i): entry for i, entry in enumerate(batch)}
            if op == "delete":
                response = await self._client.delete_message_batch(
                    QueueUrl=url, Entries=[{"Id": i, "ReceiptHandle": e.receipt} for i, e in ids.items()]
                )
            else:
                response = await self._client.change_message_visibility_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": i, "ReceiptHandle": e.receipt, "VisibilityTimeout": e.seconds}
                        for i, e in ids.items()
                    ],
                )
        except Exception as exc:
            self._retry(op, url, batch, repr(exc))
            return
        finally:
            self._slots.release()
        if op == "delete":
            self.deleted += len(response.get("Successful") or ())
        failed = response.get("Failed") or ()
        again = []
        for failure in failed:
            entry = ids.get(str(failure.get("Id")))
            if entry is None:
                continue
            reason = f"{failure.get('Code')}: {failure.get('Message')}"
            if failure.get("SenderFault"):
                self._count_error(op, 1)
                self._log.warning(
                    "source %s: %s refused for a message of %s (%s); it is delivered again later",
                    self._source,
                    op,
                    url,
                    reason,
                )
            else:
                again.append(entry)
        if again:
            self._retry(op, url, again, "partial failure of the batch")

    def _retry(self, op: Op, url: str, entries: list[_Entry], reason: str) -> None:
        keep = [e for e in entries if e.attempt < _ATTEMPTS]
        lost = len(entries) - len(keep)
        if lost:
            self._count_error(op, lost)
            self._log.warning(
                "source %s: %d %s call(s) on %s failed %d times (%s); those messages are delivered again",
                self._source,
                lost,
                op,
                url,
                _ATTEMPTS,
                reason,
            )
        if not keep:
            return
        for entry in keep:
            entry.attempt += 1
        delay = doubling(keep[0].attempt - 1, 0.2, 5.0)
        self._retrying += len(keep)
        asyncio.get_running_loop().call_later(delay, self._requeue, op, url, keep)

    def _requeue(self, op: Op, url: str, entries: list[_Entry]) -> None:
        self._retrying -= len(entries)
        self._pending.setdefault((op, url), []).extend(entries)
        self._wake.set()
