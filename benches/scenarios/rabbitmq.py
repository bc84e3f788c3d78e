"""``rabbitmq``: RabbitMQ queue → function, at-least-once (ack after the function answered).
The machine's broker (``RABBITMQ_URL``, default guest@127.0.0.1:5672). Each round purges
a queue of its own, publishes the backlog of N messages into it, then starts the process
under test, whose window opens at the first delivery, so what is measured is the consumer,
not start-up. The latency probe is published into the same queue, paced."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from _common import stamped_payload
from scenarios._base import (
    Context,
    ScenarioResult,
    System,
    Target,
    Window,
    alternate,
    delivery_window,
    verify_exact,
)
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline
from scenarios._wrk import WrkCeiling

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
_WINDOW = 1000
"""Publishes awaiting confirmation at once while the backlog is written."""


@dataclass
class QueueFeed:
    channel: Any
    payload: int
    queue: str = field(default_factory=lambda: f"bench.rabbitmq.{uuid.uuid4().hex[:8]}")
    fanout: int = 1

    async def prepare_round(self, ctx: Context, round_id: int) -> None:
        q = await self.channel.declare_queue(self.queue, durable=False)
        await q.purge()
        n = ctx.options.messages
        for start in range(0, n, _WINDOW):
            count = min(_WINDOW, n - start)
            await asyncio.gather(*(self._publish() for _ in range(count)))

    async def _publish(self) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(stamped_payload(self.payload)), self.queue
        )

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        n = ctx.options.messages
        window = await delivery_window(ctx, n, process.pid)
        return window, await verify_exact(ctx, n)

    async def probe(self, n: int, rate: float) -> None:
        started = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                await asyncio.gather(*(self._publish() for _ in range(due - sent)))
                sent = due
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.channel.queue_delete(self.queue)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "rabbitmq",
        "RabbitMQ queue → function (backlog, ack after success)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        targets=[Target("≥ 5x aio-pika + aiohttp (issue 13)", "ratio_baseline", 5.0)],
    )
    connection = await aio_pika.connect_robust(URL)
    try:
        channel = await connection.channel()
        feed = QueueFeed(channel, o.payload)
        # Non-durable, like the other scenarios' memory streams: the broker's disk is not measured.
        source = {"type": "rabbitmq", "url": URL, "queues": [{"name": feed.queue, "durable": False}]}

        async def fastconn(ctx: Context, _round: int) -> Running:
            return await start_daemon(ctx, daemon_config(ctx, [feed.queue], [source]))

        async def baseline(ctx: Context, _round: int) -> Running:
            return await start_pipeline(ctx, "rabbitmq", ["--server", URL, "--subject", feed.queue])

        systems: list[System] = [
            ProcessSystem("fastconn", "fastconn daemon (rabbitmq source)", feed, fastconn),
            ProcessSystem(
                "baseline", f"aio-pika consumer + aiohttp ({o.inflight} in flight)", feed, baseline
            ),
            WrkCeiling(o.payload, o.inflight),
        ]
        try:
            return [await alternate(ctx, result, systems)]
        finally:
            await feed.close()
    finally:
        await connection.close()
