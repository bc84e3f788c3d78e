"""``pushbullet``: channel pushes → function. A local double of Pushbullet's API
(``tests/pushbullet_double.py``, in the bench process) holds N new pushes of one channel and
sends one ``push`` tickle; fastconn's daemon (the pushbullet source: the listing in pages of
500, one dispatcher batch per chunk) against the naive connector loop (one REST request per
push, a subscriptions lookup per push, 64 calls in flight). The window opens when the pushes
are created, so listing them is measured too. No latency probe: bodies are push JSON."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from _common import proc_peak_rss_mb
from fastconn.testing import wait_for
from scenarios._base import Context, Role, Sample, ScenarioResult, System, alternate, delivery_window
from scenarios._process import BENCHES, Running, daemon_config, start_daemon, start_pipeline

sys.path.insert(0, str(BENCHES.parent / "tests"))
from pushbullet_double import PushbulletDouble

CHANNEL = "bench"


@dataclass
class PushbulletSystem:
    role: Role
    label: str
    double: PushbulletDouble
    rounds: int = 0

    async def _launch(self, ctx: Context) -> Running:
        if self.role == "fastconn":
            source: dict[str, Any] = {
                "type": "pushbullet",
                "access_token": self.double.token,
                "api_url": self.double.api_url,
                "stream_url": self.double.stream_url,
                "checkpoint": {"path": str(ctx.options.workdir / f"pushbullet-{self.rounds}.checkpoint")},
            }
            connections = self.double.stream_connections
            process: Running = await start_daemon(ctx, daemon_config(ctx, [CHANNEL], [source]))
            await wait_for(lambda: self.double.stream_connections > connections, 30, what="the stream")
            return process
        args = ["--server", self.double.api_url, "--subject", self.double.token]
        return await start_pipeline(ctx, "pushbullet", args)

    async def round(self, ctx: Context) -> Sample:
        self.rounds += 1
        n = ctx.options.messages
        await ctx.sink.reset()
        process = await self._launch(ctx)
        payload = "x" * ctx.options.payload

        async def publish() -> None:
            for _ in range(n):
                self.double.create_push(CHANNEL, tickle=False, body=payload)
            self.double.tickle()

        try:
            window = await delivery_window(ctx, n, process.pid, start=publish)
            rss = proc_peak_rss_mb(process.pid)
        finally:
            await process.stop()
        requests = len(self.double.requests)
        self.double.requests.clear()
        extra = {**window.busy, "api_requests": float(requests)}
        return Sample(window.rate, window.messages, None, None, window.cpu_per_100k(), rss, extra)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    # The naive loop makes two requests per push (a few hundred pushes/s here, less under load):
    # a hundredth of --messages keeps its rounds well within the delivery timeout.
    messages = max(1000, o.messages // 100)
    result = ScenarioResult(
        "pushbullet",
        "Pushbullet channel pushes → function (REST listing after a tickle)",
        {"messages": messages, "payload": o.payload, "inflight": o.inflight},
    )
    double = PushbulletDouble(nop_interval=30.0)
    double.add_channel(CHANNEL)
    await double.start()
    try:
        scaled = dataclasses.replace(ctx, options=dataclasses.replace(o, messages=messages))
        systems: list[System] = [
            PushbulletSystem("fastconn", "fastconn daemon (pushbullet source, pages of 500)", double),
            PushbulletSystem(
                "baseline",
                f"naive loop: a request per push + subscriptions lookup ({o.inflight} in flight)",
                double,
            ),
        ]
        await alternate(scaled, result, systems)
    finally:
        await double.stop()
    result.notes.append(
        "the API double runs in the bench process; api_requests = REST requests per round "
        "(fastconn: users/me, subscriptions, channels, listing pages; baseline: two per push)"
    )
    return [result]
