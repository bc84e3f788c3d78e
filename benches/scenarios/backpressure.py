"""``backpressure``: the function stalls mid-run while input keeps coming. JetStream (so
nothing may be lost and the sink count can be checked): fastconn works through a backlog,
then the sink holds every answer for ``stall`` seconds (10 s; 1 s with --quick) while the
publisher keeps adding messages at the rate fastconn had been consuming (the full input
rate). fastconn must stop pulling instead of buffering: its peak RSS is the figure. After the
stall: the recovery time is how long after the sink comes back the delivery rate is back to
90% of full rate over a 250 ms window, full rate being the lower of the rate before the stall
and the steady rate from 2 s after it. Every message must arrive. Each round's trace (sink
count and RSS every 20 ms) is written to ``work/backpressure-trace-N.csv``.

fastconn only: the targets are absolute (peak RSS < 300 MB, recovery ≤ 2 s)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import proc_peak_rss_mb
from scenarios._base import Context, Role, Sample, ScenarioResult, Target, alternate, delivery_timeout
from scenarios._brokers import RawNatsPublisher, nats_server
from scenarios._process import daemon_config, start_daemon
from scenarios.jetstream import FILTER, STREAM, create_stream, jetstream_source

SUBJECT = "bench.backlog"
RECOVERED = 0.9
"""Recovered: the delivery rate is back to this share of the rate before the stall."""
RATE_WINDOW = 0.25


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next((ln for ln in f if ln.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1]) / 1024


@dataclass
class Trace:
    """(seconds, sink count, RSS MB) every ``interval``."""

    pid: int
    points: list[tuple[float, int, float]] = field(default_factory=list)

    async def until(self, ctx: Context, done: Any, interval: float = 0.02) -> None:
        while True:
            count = await ctx.sink.count()
            self.points.append((time.perf_counter(), count, _rss_mb(self.pid)))
            if done(count):
                return
            await asyncio.sleep(interval)

    def rate_between(self, start: float, end: float) -> float:
        inside = [p for p in self.points if start <= p[0] <= end]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def recovery(self, released: float, target: float) -> float | None:
        """Seconds from ``released`` to the start of the first window at ``target`` rate."""
        for t, _, _ in self.points:
            if t >= released and self.rate_between(t, t + RATE_WINDOW) >= target:
                return t - released
        return None

    def steady_rate(self, start: float) -> float:
        """The median windowed rate from ``start`` to the end of the trace."""
        rates = [
            self.rate_between(t, t + RATE_WINDOW)
            for t, _, _ in self.points
            if t >= start and t + RATE_WINDOW <= self.points[-1][0]
        ]
        return statistics.median(rates) if rates else 0.0

    def write(self, path: Path, zero: float) -> None:
        """The trace as CSV (seconds from ``zero``, sink count, RSS): to look at a bad round."""
        lines = ["seconds,delivered,rss_mb"]
        lines += [f"{t - zero:.3f},{count},{rss:.1f}" for t, count, rss in self.points]
        path.write_text("\n".join(lines) + "\n")


@dataclass
class StallRound:
    role: Role
    label: str
    url: str
    js: Any
    publisher: RawNatsPublisher
    rounds: int = 0

    async def round(self, ctx: Context) -> Sample:
        o = ctx.options
        self.rounds += 1
        before = 0.5 if o.quick else 2.0
        # Enough to keep fastconn busy until the stall starts (it takes ~50k/s at most here).
        backlog = max(o.messages, 30_000 if o.quick else 150_000)
        await self.js.purge_stream(STREAM)
        await self.publisher.burst(SUBJECT, backlog, o.payload)
        await ctx.sink.reset()
        source = jetstream_source(self.url, f"stall{self.rounds}")
        daemon = await start_daemon(ctx, daemon_config(ctx, [FILTER], [source]))
        trace = Trace(daemon.pid)
        try:
            await trace.until(ctx, lambda count: count > 0, 0.005)
            started = trace.points[-1][0]
            await trace.until(ctx, lambda _: time.perf_counter() - started >= before)
            rate = trace.rate_between(started, time.perf_counter())
            rss_before = trace.points[-1][2]
            more = int(rate * o.stall_seconds)
            await ctx.sink.stall(int(o.stall_seconds * 1000))
            stalled = time.perf_counter()
            feeding = asyncio.create_task(self.publisher.paced(SUBJECT, more, o.payload, rate))
            released = stalled + o.stall_seconds
            total = backlog + more
            deadline = time.monotonic() + o.stall_seconds + delivery_timeout(total)
            await trace.until(ctx, lambda c: c >= total or time.monotonic() > deadline)
            await feeding
            received = trace.points[-1][1]
            if received < total:
                raise RuntimeError(f"the sink received {received:,} of {total:,} messages")
            # "Full rate" is the lower of the rate before the stall and the steady rate from 2 s
            # after it: on a shared machine the rate drifts, and a stall does not make it faster.
            full = min(rate, trace.steady_rate(released + 2.0) or rate)
            recovery = trace.recovery(released, RECOVERED * full)
            after = trace.rate_between(released + (recovery or 0), released + (recovery or 0) + 1.0)
            trace.write(o.workdir / f"backpressure-trace-{self.rounds}.csv", released)
            peak = proc_peak_rss_mb(daemon.pid)
        finally:
            await daemon.stop()
        return Sample(
            rate=rate,
            messages=total,
            rss_mb=peak,
            extra={
                "recovery_s": recovery if recovery is not None else float("inf"),
                "rss_before_stall_mb": rss_before,
                "rate_after_mps": after,
            },
        )


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "backpressure",
        f"JetStream, function stalled {o.stall_seconds:g} s mid-run at full input rate",
        {"payload": o.payload, "inflight": o.inflight, "stall_s": o.stall_seconds},
        targets=[
            Target("peak RSS < 300 MB", "at_most", 300.0, "rss_mb"),
            Target("recovery ≤ 2 s", "at_most", 2.0, "recovery_s"),
        ],
    )
    with nats_server(o.workdir, ctx.watch) as url:
        nc, js = await create_stream(url, [FILTER])
        try:
            async with RawNatsPublisher(url) as publisher:
                system = StallRound("fastconn", "fastconn daemon (jetstream source)", url, js, publisher)
                await alternate(ctx, result, [system])
        finally:
            await nc.close()
    result.notes.append(
        "msg/s = the rate before the stall; recovery = seconds after the sink came back until a "
        f"{RATE_WINDOW * 1000:.0f} ms window ran at {RECOVERED:.0%} of full rate (the lower of the "
        "rate before the stall and the steady rate from 2 s after it)"
    )
    return [result]
