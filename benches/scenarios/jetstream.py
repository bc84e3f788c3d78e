"""``jetstream``: JetStream → function, at-least-once (ack after the function answered). The
stream (memory storage) holds a backlog of N messages published once; every round binds a
new durable that reads it from the start, and its window opens at the first delivery, so
what is measured is the consumer, not start-up. The latency probe goes to a second subject,
purged before each round so a new durable does not replay old probes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats

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
from scenarios._brokers import RawNatsPublisher, nats_server
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline
from scenarios._wrk import WrkCeiling

STREAM = "BENCH"
BACKLOG = "bench.backlog"
PROBE = "bench.probe"
FILTER = "bench.>"


async def create_stream(url: str, subjects: list[str]) -> tuple[Any, Any]:
    """A memory stream (the broker's disk is not what is measured); returns (client, js)."""
    from nats.js.api import StorageType

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=subjects, storage=StorageType.MEMORY)
    return nc, js


async def publish_backlog(js: Any, publisher: RawNatsPublisher, subject: str, n: int, payload: int) -> None:
    await publisher.burst(subject, n, payload)
    stored = (await js.stream_info(STREAM)).state.messages
    if stored < n:
        raise RuntimeError(f"the stream stored {stored:,} of {n:,} published messages")


def jetstream_source(url: str, durable: str) -> dict[str, Any]:
    return {"type": "jetstream", "servers": [url], "stream": STREAM, "durable": durable, "subjects": [FILTER]}


@dataclass
class BacklogFeed:
    js: Any
    publisher: RawNatsPublisher
    payload: int
    fanout: int = 1

    async def prepare_round(self, ctx: Context, round_id: int) -> None:
        await self.js.purge_stream(STREAM, subject=PROBE)

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        n = ctx.options.messages
        window = await delivery_window(ctx, n, process.pid)
        return window, await verify_exact(ctx, n)

    async def probe(self, n: int, rate: float) -> None:
        await self.publisher.paced(PROBE, n, self.payload, rate)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "jetstream",
        "JetStream → function (backlog, ack after success)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        targets=[Target("≥ 4x nats-py + aiohttp (issue 3)", "ratio_baseline", 4.0)],
    )
    with nats_server(o.workdir, ctx.watch) as url:
        nc, js = await create_stream(url, [FILTER])
        try:
            async with RawNatsPublisher(url) as publisher:
                await publish_backlog(js, publisher, BACKLOG, o.messages, o.payload)
                feed = BacklogFeed(js, publisher, o.payload)

                async def fastconn(ctx: Context, round_id: int) -> Running:
                    source = jetstream_source(url, f"fastconn{round_id}")
                    return await start_daemon(ctx, daemon_config(ctx, [FILTER], [source]))

                async def baseline(ctx: Context, round_id: int) -> Running:
                    args = [
                        "--server",
                        url,
                        "--stream",
                        STREAM,
                        "--subject",
                        FILTER,
                        "--group",
                        f"base{round_id}",
                    ]
                    return await start_pipeline(ctx, "jetstream", args)

                systems: list[System] = [
                    ProcessSystem("fastconn", "fastconn daemon (jetstream source)", feed, fastconn),
                    ProcessSystem(
                        "baseline",
                        f"nats-py pull consumer + aiohttp ({o.inflight} in flight)",
                        feed,
                        baseline,
                    ),
                    WrkCeiling(o.payload, o.inflight),
                ]
                return [await alternate(ctx, result, systems)]
        finally:
            await nc.close()
