"""Helpers for the SQS source's tests: an aiobotocore client on the test's moto server
(:mod:`aws_fixtures`) to create queues, send, peek and count, and daemon configs."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiobotocore.session import get_session

from aws_fixtures import REGION, MotoServer
from fastconn.testing import FunctionDouble, wait_for


@dataclass
class Sqs:
    """A client on the test's moto server."""

    client: Any
    s3: Any
    endpoint_url: str

    async def queue(self, label: str = "q", *, fifo: bool = False, **attributes: str) -> str:
        name = f"{label}-{uuid.uuid4().hex[:6]}" + (".fifo" if fifo else "")
        if fifo:
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "true", **attributes}
        response = await self.client.create_queue(QueueName=name, Attributes=attributes)
        return str(response["QueueUrl"])

    async def arn(self, url: str) -> str:
        response = await self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(response["Attributes"]["QueueArn"])

    async def send(
        self, url: str, body: str, attributes: Mapping[str, str] | None = None, **extra: Any
    ) -> str:
        kwargs: dict[str, Any] = {"QueueUrl": url, "MessageBody": body, **extra}
        if attributes:
            kwargs["MessageAttributes"] = {
                k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
            }
        response = await self.client.send_message(**kwargs)
        return str(response["MessageId"])

    async def send_many(self, url: str, bodies: Sequence[str], concurrency: int = 16) -> None:
        batches = [bodies[i : i + 10] for i in range(0, len(bodies), 10)]
        slots = asyncio.Semaphore(concurrency)

        async def one(batch: Sequence[str]) -> None:
            async with slots:
                entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(batch)]
                response = await self.client.send_message_batch(QueueUrl=url, Entries=entries)
                assert not response.get("Failed"), response["Failed"]

        await asyncio.gather(*(one(b) for b in batches))

    async def stream(
        self, url: str, bodies: Sequence[str], delivered: Callable[[], int], depth: int = 50
    ) -> None:
        """Sends ``bodies`` while at most ``depth`` of them are not delivered yet: moto's cost
        per call grows with the messages in the queue (it scans them all), so a 20,000 backlog
        would take it many minutes to even accept."""
        for start in range(0, len(bodies), 100):
            while start - delivered() > depth:
                await asyncio.sleep(0.02)
            await self.send_many(url, bodies[start : start + 100])

    async def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight) messages of the queue."""
        response = await self.client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        a = response["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

    async def drained(self, url: str, timeout: float = 45.0) -> None:
        """Waits until the queue holds nothing, visible or in flight. Longer than the source's
        default visibility timeout (30s): moto's DeleteMessage rebuilds the queue's message
        list without a lock, so two concurrent deletes (concurrent batches, two replicas) can
        undo one another; the undone message stays in flight until its visibility ends, then
        comes back and is delivered and deleted again (a duplicate, as SQS allows)."""

        async def empty() -> bool:
            return await self.counts(url) == (0, 0)

        await wait_for(empty, timeout, 0.1, f"{url} empty")

    async def receive_all(self, url: str) -> list[dict[str, Any]]:
        """Takes every message now visible (the test as a competing consumer)."""
        out: list[dict[str, Any]] = []
        while messages := await self._receive(url, 0):
            out.extend(messages)
        return out

    async def receive_n(self, url: str, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Takes messages until ``n`` arrived (long polls; fails after ``timeout``)."""
        out: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < n:
            if loop.time() > deadline:
                raise TimeoutError(f"{len(out)} of {n} messages arrived in {url} within {timeout}s")
            out.extend(await self._receive(url, 1))
        return out

    async def _receive(self, url: str, wait: int) -> list[dict[str, Any]]:
        response = await self.client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages") or [])


@pytest.fixture
async def sqs(moto_server: MotoServer) -> AsyncIterator[Sqs]:
    session = get_session()
    kwargs = {"region_name": REGION, "endpoint_url": moto_server.endpoint_url}
    async with session.create_client("sqs", **kwargs) as client, session.create_client("s3", **kwargs) as s3:
        yield Sqs(client, s3, moto_server.endpoint_url)


def sqs_source(sqs: Sqs, queue_urls: Sequence[str] | str, **options: Any) -> dict[str, Any]:
    return {
        "type": "sqs",
        "queue_urls": queue_urls if isinstance(queue_urls, str) else list(queue_urls),
        "endpoint_url": sqs.endpoint_url,
        "region": REGION,
        "wait_time": "1s",
        "retry_delay": "1s",
        "backoff_max": "4s",
        **options,
    }


def daemon_config(
    double: FunctionDouble,
    functions: Mapping[str, Sequence[str]],
    sources: Sequence[Mapping[str, Any]],
    *,
    function_timeout: str | None = None,
    **dispatch: Any,
) -> dict[str, Any]:
    """Static functions ``name -> topics`` served by ``double`` at ``/<name>``; one attempt per
    call unless asked (the source's redelivery is what these tests look at)."""
    extra = {"timeout": function_timeout} if function_timeout else {}
    return {
        "log_level": "info",
        "dispatch": {
            "backoff_initial": "10ms",
            "backoff_max": "50ms",
            "max_attempts": 1,
            "shutdown_timeout": "5s",
            **dispatch,
        },
        "functions": [
            {"name": name, "url": double.url(f"/{name}"), "topics": list(topics), **extra}
            for name, topics in functions.items()
        ],
        "sources": list(sources),
    }


def attributes_of(message: Mapping[str, Any]) -> dict[str, str]:
    return {k: v.get("StringValue", "") for k, v in (message.get("MessageAttributes") or {}).items()}


def json_body(message: Mapping[str, Any]) -> Any:
    return json.loads(message["Body"])
