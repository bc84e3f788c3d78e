"""``sqs``: SQS queue → function, at-least-once (delete after the function answered), on a
moto server (SQS's API over HTTP, in Python). Each round creates a queue, starts the process
under test and streams the round's messages (at most 3,000: moto's pace) into the queue, at most 200
undelivered at a time (see :class:`QueueFeed`). The latency probe is sent into the same
queue, paced. moto is the bottleneck of both systems: the window reports its CPU
(``broker_busy``) next to theirs.

A second result measures the source's own path without a server: S3 notifications decoded
(``decode = "s3"``) into messages and their settlement decided, records per second."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.session import get_session

from _common import stamped_payload
from fastconn.message import Outcome, Verdict
from fastconn.sources.sqs.config import SqsConfig
from fastconn.sources.sqs.settle import decide, worse
from fastconn.sources.sqs.source import SqsSource, _Queue, _Received
from fastconn.testing import ServerProcess, free_port, moto_command
from scenarios._base import (
    Context,
    Role,
    Sample,
    ScenarioResult,
    System,
    Target,
    Window,
    alternate,
    delivery_window,
    verify_exact,
)
from scenarios._brokers import watched
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline

REGION = "us-east-1"
_MAX_MESSAGES = 3_000
"""moto delivers 30-150 messages/s here, to either consumer: a round of more would make a full
run last hours and still measure only moto."""
_SEND_CONCURRENCY = 16


@dataclass
class QueueFeed:
    """Streams the round's messages into a fresh queue while the process consumes, keeping at
    most ``depth`` of them undelivered: moto scans every message of a queue on each send,
    receive and delete, so a 50,000 backlog would take it hours to even accept. Both systems
    get the same feed; the window opens when the feed starts."""

    client: Any
    payload: int
    messages: int
    depth: int = 200
    url: str = ""
    fanout: int = 1
    queues: list[str] = field(default_factory=list)

    async def prepare_round(self, ctx: Context, round_id: int) -> None:
        name = f"bench-sqs-{round_id}-{uuid.uuid4().hex[:6]}"
        self.url = str((await self.client.create_queue(QueueName=name))["QueueUrl"])
        self.queues.append(self.url)

    async def _send(self, n: int) -> None:
        slots = asyncio.Semaphore(_SEND_CONCURRENCY)

        async def batch(count: int) -> None:
            async with slots:
                entries = [
                    {"Id": str(i), "MessageBody": stamped_payload(self.payload).decode()}
                    for i in range(count)
                ]
                response = await self.client.send_message_batch(QueueUrl=self.url, Entries=entries)
                if response.get("Failed"):
                    raise RuntimeError(f"moto refused messages: {response['Failed'][:2]}")

        await asyncio.gather(*(batch(min(10, n - start)) for start in range(0, n, 10)))

    async def _stream(self, ctx: Context) -> None:
        step = 100
        for start in range(0, self.messages, step):
            while start - await ctx.sink.count() > self.depth:
                await asyncio.sleep(0.01)
            await self._send(min(step, self.messages - start))

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        # moto passes 20-300 messages/s on this shared machine: the default window timeout (1,000/s) is
        # too short.
        timeout = 60.0 + self.messages / 10
        window = await delivery_window(
            ctx, self.messages, process.pid, start=lambda: self._stream(ctx), timeout=timeout
        )
        return window, await verify_exact(ctx, self.messages)

    async def probe(self, n: int, rate: float) -> None:
        started = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                await self._send(due - sent)
                sent = due
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for url in self.queues:
            await self.client.delete_queue(QueueUrl=url)


@dataclass
class DecodeSettle:
    """The ``decode = "s3"`` path in this process, without a server: notification bodies (one
    record each, as S3 sends them to SQS) turned into the core's messages, every message's
    outcome folded into its notification's and the settlement decided."""

    role: Role
    label: str

    async def round(self, ctx: Context) -> Sample:
        n = 2_000 if ctx.options.quick else 20_000
        return await asyncio.to_thread(_decode_settle_round, n)


def _decode_settle_round(n: int) -> Sample:
    config = SqsConfig(queue_urls=("http://127.0.0.1:1/123456789012/uploads",), region=REGION, decode="s3")
    source = SqsSource(config)
    queue = _Queue(config.queue_urls[0], "uploads", fifo=False)
    bodies = [_notification(i) for i in range(n)]
    started = time.perf_counter()
    records = 0
    for i, body in enumerate(bodies):
        received = _Received(queue, f"r{i}", f"m{i}", body, {}, 1, None, 0.0, 0.0)
        parts = source._parts(received) or []
        records += len(parts)
        worst = None
        for part in parts:
            worst = worse(worst, Outcome(part, Verdict.OK, part.message_id or ""))
        decide(worst, attempts=1, max_deliver=5, dead_letters=False, initial=1.0, maximum=60.0)
    seconds = time.perf_counter() - started
    return Sample(records / seconds, records, extra={"us_per_record": seconds / records * 1e6})


def _notification(i: int) -> str:
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": "2026-12-03T10:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "uploads",
            "bucket": {
                "name": "img.example.com",
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": "arn:aws:s3:::img.example.com",
            },
            "object": {
                "key": f"photos/cat+{i}.jpg",
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "sequencer": f"{i:018X}",
            },
        },
    }
    return json.dumps({"Records": [record]})


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    messages = min(o.messages, _MAX_MESSAGES)
    result = ScenarioResult(
        "sqs",
        "SQS queue (moto server) → function (streamed, delete after success)",
        {"messages": messages, "payload": o.payload, "inflight": o.inflight},
        targets=[Target("≥ 3x aiobotocore + aiohttp (issue 14)", "ratio_baseline", 3.0)],
    )
    decode = ScenarioResult("sqs-decode", 'decode = "s3" and settlement, no server (records/s)', {})
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        os.environ.setdefault(name, value)
    port = free_port()
    moto = ServerProcess("moto", moto_command(port), port, o.workdir / "moto.log", timeout=30.0)
    endpoint = f"http://127.0.0.1:{port}"
    with watched(moto, ctx.watch):
        async with get_session().create_client("sqs", region_name=REGION, endpoint_url=endpoint) as client:
            feed = QueueFeed(client, o.payload, messages)

            async def fastconn(ctx: Context, _round: int) -> Running:
                source = {
                    "type": "sqs",
                    "queue_urls": [feed.url],
                    "endpoint_url": endpoint,
                    "region": REGION,
                    "wait_time": "1s",
                }
                topic = feed.url.rpartition("/")[2]
                return await start_daemon(ctx, daemon_config(ctx, [topic], [source]))

            async def baseline(ctx: Context, _round: int) -> Running:
                return await start_pipeline(ctx, "sqs", ["--server", endpoint, "--subject", feed.url])

            systems: list[System] = [
                ProcessSystem("fastconn", "fastconn daemon (sqs source)", feed, fastconn),
                ProcessSystem(
                    "baseline", f"aiobotocore receive (10) + aiohttp ({o.inflight} in flight)", feed, baseline
                ),
            ]
            try:
                await alternate(ctx, result, systems)
            finally:
                await feed.close()
    await alternate(ctx, decode, [DecodeSettle("fastconn", "decode_notification + settle decision")])
    return [result, decode]
