"""``sources/sqs/batch.py``: per-entry failures of ``DeleteMessageBatch`` /
``ChangeMessageVisibilityBatch``. A sender fault (moto answers one for an invalid receipt
handle) is final and counted; a failure on SQS's side and a failed call are tried again, a
bounded number of times. moto never fails on its side, so those paths use a scripted client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aws_fixtures import MotoServer, aws_env, moto_server  # noqa: F401
from fastconn.sources.sqs import batch
from fastconn.sources.sqs.batch import BatchCalls
from fastconn.testing import wait_for
from sqs_fixtures import Sqs, sqs

__all__ = ["sqs"]  # fixtures, used by name

log = logging.getLogger("test_sqs_batch")


class Errors:
    def __init__(self) -> None:
        self.counted: list[tuple[str, int]] = []

    def __call__(self, op: str, n: int) -> None:
        self.counted.append((op, n))


class ScriptedClient:
    """Answers each batch call with the next scripted step: ``"ok"`` (every entry succeeds),
    ``"raise"`` (the call fails), or a set of entry positions that fail on SQS's side."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.calls: list[tuple[str, list[dict[str, Any]]]] = []

    async def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        return self._answer("delete", Entries)

    async def change_message_visibility_batch(
        self,
        QueueUrl: str,
        Entries: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return self._answer("visibility", Entries)

    def _answer(self, op: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append((op, entries))
        step = self.steps.pop(0) if self.steps else "ok"
        if step == "raise":
            raise ConnectionError("connection reset by peer")
        failing = set() if step == "ok" else step
        failed = [
            {"Id": e["Id"], "SenderFault": False, "Code": "InternalError", "Message": "try again"}
            for i, e in enumerate(entries)
            if i in failing
        ]
        ok = [{"Id": e["Id"]} for i, e in enumerate(entries) if i not in failing]
        return {"Successful": ok, "Failed": failed}

    def receipts(self, op: str) -> list[str]:
        return [e["ReceiptHandle"] for o, entries in self.calls if o == op for e in entries]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry delays (0.2s doubling) are real time: shorter here, the count is what matters."""
    monkeypatch.setattr(batch, "doubling", lambda *_args: 0.01)


@pytest.fixture
async def started() -> AsyncIterator[Callable[[BatchCalls], BatchCalls]]:
    """``started(calls)`` runs ``calls`` (its send loop) until the test ends."""
    tasks: list[asyncio.Task[None]] = []

    def start(calls: BatchCalls) -> BatchCalls:
        tasks.append(asyncio.create_task(calls.run()))
        return calls

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


Start = Callable[[BatchCalls], BatchCalls]


async def test_moto_sender_fault_is_final_and_counted(sqs: Sqs, started: Start) -> None:
    url = await sqs.queue("batch")
    await sqs.send_many(url, ["a", "b", "c"])
    received = await sqs.receive_n(url, 3)
    receipts = [m["ReceiptHandle"] for m in received]
    errors = Errors()
    calls = started(BatchCalls(sqs.client, "sqs", log, errors))
    calls.delete(url, receipts[0])
    calls.delete(url, "not-a-receipt-handle")
    calls.delete(url, receipts[1])
    await wait_for(lambda: calls.idle and calls.deleted == 2, 10, what="the batch answered")
    assert errors.counted == [("delete", 1)]  # the invalid handle: refused, not tried again
    assert await sqs.counts(url) == (0, 1)  # the third message is still in flight, not lost


async def test_server_side_entry_failures_are_sent_again(fast_retries: None, started: Start) -> None:
    client = ScriptedClient([{1}, "ok"])  # the second entry fails on SQS's side once
    errors = Errors()
    calls = started(BatchCalls(client, "sqs", log, errors))
    for receipt in ("r0", "r1", "r2"):
        calls.delete("q", receipt)
    await wait_for(lambda: calls.idle and calls.deleted == 3, 5, what="every delete done")
    assert client.receipts("delete") == ["r0", "r1", "r2", "r1"]  # only the failed entry again
    assert errors.counted == []


async def test_batches_of_ten_and_a_failing_call_gives_up_after_five_attempts(
    fast_retries: None, started: Start
) -> None:
    client = ScriptedClient(["ok", "ok", *["raise"] * 5])
    errors = Errors()
    calls = started(BatchCalls(client, "sqs", log, errors))
    for i in range(12):
        calls.delete("q", f"d{i}")
    await wait_for(lambda: calls.idle and calls.deleted == 12, 5, what="twelve deletes")
    assert [len(entries) for _, entries in client.calls] == [10, 2]
    calls.change_visibility("q", "v0", 50_000.4)  # clamped to SQS's 12 hours
    await wait_for(lambda: calls.idle, 5, what="the visibility change given up")
    visibility = [entries for op, entries in client.calls if op == "visibility"]
    assert len(visibility) == 5  # the first try and four more
    assert {e[0]["VisibilityTimeout"] for e in visibility} == {43_200}
    assert errors.counted == [("visibility", 1)]


async def test_flush_waits_for_an_entry_being_retried(fast_retries: None) -> None:
    """Shutting down mid-retry: the entry waiting out its delay is still sent (not idle)."""
    client = ScriptedClient(["raise"])
    calls = BatchCalls(client, "sqs", log, Errors())
    calls.delete("q", "a")
    await calls.flush(5.0)
    assert calls.idle and calls.deleted == 1
    assert client.receipts("delete") == ["a", "a"]


async def test_flush_sends_what_is_pending_without_the_run_loop() -> None:
    client = ScriptedClient([])
    calls = BatchCalls(client, "sqs", log, Errors())
    calls.delete("q", "a")
    calls.change_visibility("q", "b", 3)
    await calls.flush(5.0)
    assert calls.idle and calls.deleted == 1
    assert sorted(op for op, _ in client.calls) == ["delete", "visibility"]
