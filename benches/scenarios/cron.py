"""``cron``: fire-time accuracy. 1,000 functions on a per-second schedule; every call's
lateness (arrival at the receiver minus its ``X-Cron-Scheduled-Time``) is recorded by a
receiver in the bench process. fastconn's daemon (cron source, no store) against the naive
croniter + aiohttp baseline (one task per function, 64 in flight). Figures per round: p50/p99
lateness, fires per second, missed and duplicated slots inside the window, CPU per 100k fires.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from _common import proc_cpu_seconds, proc_peak_rss_mb
from scenarios._base import Context, Sample, ScenarioResult, System, Target, alternate
from scenarios._brokers import nats_server
from scenarios._process import Running, bounded_daemon_config, start_baseline_script, start_daemon
from scenarios._receiver import TimingReceiver

FUNCTIONS = 1000
SCHEDULE = "* * * * * *"
WARM_UP = 3.0


def scheduled_time(headers: Mapping[str, str], _body: bytes) -> float:
    """A fire is late against its ``X-Cron-Scheduled-Time``."""
    return datetime.fromisoformat(headers["x-cron-scheduled-time"]).timestamp()


Launch = Callable[[Context, TimingReceiver], Awaitable[Running]]


@dataclass
class CronSystem:
    role: str
    label: str
    receiver: TimingReceiver
    launch: Launch
    seconds: float

    async def round(self, ctx: Context) -> Sample:
        self.receiver.calls.clear()
        process = await self.launch(ctx, self.receiver)
        try:
            await asyncio.sleep(WARM_UP)  # start-up and the first table are not what is measured
            first = float(int(time.time()) + 1)
            cpu = proc_cpu_seconds(process.pid)
            await asyncio.sleep(self.seconds + 1)
            cpu = proc_cpu_seconds(process.pid) - cpu
            last = float(int(time.time()) - 1)  # later slots may still be on their way
            await asyncio.sleep(1.0)
            rss = proc_peak_rss_mb(process.pid)
        finally:
            await process.stop()
        window = [(f, s, late) for f, s, late in self.receiver.calls if first <= s <= last]
        lateness = sorted(late * 1000 for _, _, late in window)
        seen = Counter((f, s) for f, s, _ in window)
        expected = FUNCTIONS * int(last - first + 1)
        n = len(window)
        return Sample(
            rate=n / (last - first + 1),
            messages=n,
            p50_ms=statistics.median(lateness) if lateness else None,
            p99_ms=lateness[int(len(lateness) * 0.99) - 1] if lateness else None,
            cpu_per_100k=cpu / n * 100_000 if n else None,
            rss_mb=rss,
            extra={
                "max_ms": lateness[-1] if lateness else 0.0,
                "missed": float(expected - len(seen)),
                "duplicates": float(sum(c - 1 for c in seen.values())),
            },
        )


def _config(ctx: Context, receiver: TimingReceiver, store: str | None = None) -> dict[str, Any]:
    functions = [
        {"name": f"f{i}", "url": f"{receiver.url}/function/f{i}", "schedule": SCHEDULE}
        for i in range(FUNCTIONS)
    ]
    source: dict[str, Any] = (
        {"type": "cron"}
        if store is None
        else {"type": "cron", "store": {"type": "jetstream_kv", "servers": [store], "bucket": _bucket()}}
    )
    return bounded_daemon_config(ctx, functions, [source])


def _bucket() -> str:
    """A bucket per round: a round's daemon must not find the previous round's claims."""
    return f"bench_cron_{time.time_ns()}"


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    seconds = 5.0 if o.quick else 15.0
    result = ScenarioResult(
        "cron",
        f"cron: {FUNCTIONS} functions on a per-second schedule, fire-time lateness",
        {"functions": FUNCTIONS, "schedule": SCHEDULE, "seconds": seconds, "inflight": o.inflight},
        targets=[Target("p99 lateness ≤ 100 ms at 1,000 fires/s (issue 13)", "at_most", 100.0, "p99_ms")],
    )
    receiver = TimingReceiver(scheduled_time)  # stands in for the functions
    await receiver.start()
    try:
        with nats_server(o.workdir, ctx.watch) as nats:

            async def fastconn(ctx: Context, receiver: TimingReceiver) -> Running:
                return await start_daemon(ctx, _config(ctx, receiver))

            async def fastconn_kv(ctx: Context, receiver: TimingReceiver) -> Running:
                return await start_daemon(ctx, _config(ctx, receiver, store=nats))

            systems: list[System] = [
                CronSystem("fastconn", "fastconn daemon (cron source)", receiver, fastconn, seconds),
                CronSystem(
                    "baseline",
                    f"croniter + aiohttp, task per function ({o.inflight} in flight)",
                    receiver,
                    start_baseline,
                    seconds,
                ),
                CronSystem(
                    "fastconn_kv",
                    "fastconn daemon with a JetStream KV store (claim + done per fire)",
                    receiver,
                    fastconn_kv,
                    seconds,
                ),
            ]
            result.notes.append(
                "fastconn_kv (in the per-round lines and results.json, not in the table): the same "
                "daemon with store = jetstream_kv, so every fire is a leased claim and a done marker "
                "in the bucket (one key per function)"
            )
            return [await alternate(ctx, result, systems)]
    finally:
        await receiver.close()


async def start_baseline(ctx: Context, receiver: TimingReceiver) -> Running:
    """``python -m scenarios._cron_baseline`` from ``benches/``; it prints ``ready`` once scheduled."""
    args = [
        "--sink",
        receiver.url,
        "--inflight",
        str(ctx.options.inflight),
        "--functions",
        str(FUNCTIONS),
        "--schedule",
        SCHEDULE,
    ]
    return await start_baseline_script(
        ctx, "_cron_baseline", args, log_name="pipeline-cron", what="cron baseline"
    )
