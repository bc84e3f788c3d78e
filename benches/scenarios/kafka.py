"""``kafka``: Kafka → function on a 4-partition topic (the Tansu broker, memory storage),
at-least-once with gap-free commits, against an aiokafka + aiohttp pipeline committing after
success, and the wrk ceiling.

Unlike the other scenarios, each system's process lives for all its rounds: joining a new
consumer group takes about 5 s on Tansu, which would be most of a ``--quick`` run. Each system
consumes a topic of its own; a round produces N records to it (the producer writes whole
record batches, several times faster than any consumer here) and the window runs from the
first delivery to the last. CPU is the window's; peak RSS is the process's peak so
far (it only grows over the rounds)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from _common import proc_peak_rss_mb
from scenarios._base import (
    Context,
    Role,
    Sample,
    ScenarioResult,
    System,
    Target,
    alternate,
    delivery_window,
    latency_probe,
    verify_exact,
)
from scenarios._brokers import create_kafka_topic, kafka_broker, kafka_produce
from scenarios._process import Running, daemon_config, start_daemon, start_pipeline
from scenarios._wrk import WrkCeiling

PARTITIONS = 4


@dataclass
class KafkaSystem:
    role: Role
    label: str
    bootstrap: str
    payload: int
    process: Running | None = None
    warm: bool = False

    @property
    def topic(self) -> str:
        return f"bench-{self.role}"

    @property
    def probe_topic(self) -> str:
        return f"bench-{self.role}-probe"

    async def setup(self, ctx: Context) -> None:
        await create_kafka_topic(self.bootstrap, self.topic, PARTITIONS)
        await create_kafka_topic(self.bootstrap, self.probe_topic, 1)
        if self.role == "fastconn":
            source = {"type": "kafka", "brokers": [self.bootstrap], "group_id": "fastconn"}
            config = daemon_config(ctx, [self.topic, self.probe_topic], [source])
            self.process = await start_daemon(ctx, config)
        else:
            args = ["--server", self.bootstrap, "--group", "baseline"]
            topics = ["--topic", self.topic, "--topic", self.probe_topic]
            self.process = await start_pipeline(ctx, "kafka", [*args, *topics])

    async def warm_up(self, ctx: Context) -> None:
        """Joined and assigned once a record makes it through. Not in ``setup``: the setups
        run at the same time (so the joins overlap) and the sink count is shared."""
        await ctx.sink.reset()
        await kafka_produce(self.bootstrap, self.probe_topic, 1, self.payload, 1)
        deadline = time.monotonic() + 60
        while await ctx.sink.count() < 1:  # not a measured window: just wait for the join
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the warm-up record never reached the sink")
            await asyncio.sleep(0.02)
        await verify_exact(ctx, 1, settle=0.1)
        self.warm = True

    async def round(self, ctx: Context) -> Sample:
        assert self.process is not None
        if not self.warm:
            await self.warm_up(ctx)
        n = ctx.options.messages
        await ctx.sink.reset()
        # The window opens at the first delivery, not at the first produce: Tansu answers a
        # fetch only when its max wait (fastconn: fetch_max_wait, 100 ms) ends, even when records arrive
        # meanwhile, so an idle consumer starts up to that late (the latency probe shows it).
        producing = asyncio.create_task(
            kafka_produce(self.bootstrap, self.topic, n, self.payload, PARTITIONS)
        )
        try:
            window = await delivery_window(ctx, n, self.process.pid)
        finally:
            await producing
        excess = await verify_exact(ctx, n)

        async def probe(count: int, rate: float) -> None:
            await kafka_produce(self.bootstrap, self.probe_topic, count, self.payload, 1, rate)

        p50, p99 = await latency_probe(ctx, probe)
        extra = {**window.busy, **({"duplicates": float(excess)} if excess else {})}
        rss = proc_peak_rss_mb(self.process.pid)
        return Sample(window.rate, window.messages, p50, p99, window.cpu_per_100k(), rss, extra)

    async def close(self) -> None:
        if self.process is not None:
            await self.process.stop()


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "kafka",
        f"Kafka → function ({PARTITIONS} partitions, commit after success)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight, "partitions": PARTITIONS},
        targets=[Target("≥ 5x aiokafka + aiohttp (issues 4, 6)", "ratio_baseline", 5.0)],
    )
    with kafka_broker(o.workdir, ctx.watch) as bootstrap:
        systems: list[System] = [
            KafkaSystem("fastconn", "fastconn daemon (kafka source)", bootstrap, o.payload),
            KafkaSystem("baseline", f"aiokafka + aiohttp ({o.inflight} in flight)", bootstrap, o.payload),
            WrkCeiling(o.payload, o.inflight),
        ]
        await alternate(ctx, result, systems)
    result.notes.append(
        "one process per system for all rounds (Tansu group joins take ~5 s); peak RSS is over all rounds"
    )
    return [result]
