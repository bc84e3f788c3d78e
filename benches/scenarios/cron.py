"""``cron``: fire-time accuracy. 1,000 functions on a per-second schedule; every call's
lateness (arrival at the receiver minus its ``X-Cron-Scheduled-Time``) is recorded by a
receiver in the bench process. fastconn's daemon (cron source, no store) against the naive
croniter + aiohttp baseline (one task per function, 64 in flight). Figures per round: p50/p99
lateness, fires per second, missed and duplicated slots inside the window, CPU per 100k fires.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from _common import proc_cpu_seconds, proc_peak_rss_mb
from fastconn.testing import free_port
from scenarios._base import Context, Sample, ScenarioResult, System, Target, alternate
from scenarios._process import BENCHES, Running, RunningPipeline, start_daemon

FUNCTIONS = 1000
SCHEDULE = "* * * * * *"
WARM_UP = 3.0


_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _ReceiverProtocol(asyncio.Protocol):
    """A keep-alive HTTP/1.1 server that only reads heads and skips bodies: an aiohttp handler
    costs a few hundred microseconds, so a burst of 1,000 calls would queue in the receiver
    for a good part of a second and its lateness would be measured instead of the sender's."""

    def __init__(self, calls: list[tuple[str, float, float]]) -> None:
        self.calls = calls
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            name = lines[0].split()[1].rsplit("/", 1)[-1]
            slot = datetime.fromisoformat(headers["x-cron-scheduled-time"]).timestamp()
            self.calls.append((name, slot, arrived - slot))
            assert self.transport is not None
            self.transport.write(_RESPONSE)


@dataclass
class Receiver:
    """Stands in for the functions: records (function, scheduled slot, lateness) per call."""

    calls: list[tuple[str, float, float]] = field(default_factory=list)
    server: asyncio.Server | None = None
    url: str = ""

    async def start(self) -> None:
        port = free_port()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ReceiverProtocol(self.calls), "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


Launch = Callable[[Context, Receiver], Awaitable[Running]]


@dataclass
class CronSystem:
    role: str
    label: str
    receiver: Receiver
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


def _config(ctx: Context, receiver: Receiver) -> dict[str, Any]:
    inflight = ctx.options.inflight
    return {
        "log_level": "warning",
        "dispatch": {
            "max_inflight": inflight,
            "max_inflight_per_function": inflight,
            "shutdown_timeout": "5s",
        },
        "functions": [
            {"name": f"f{i}", "url": f"{receiver.url}/function/f{i}", "schedule": SCHEDULE}
            for i in range(FUNCTIONS)
        ],
        "sources": [{"type": "cron"}],
    }


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    seconds = 5.0 if o.quick else 15.0
    result = ScenarioResult(
        "cron",
        f"cron: {FUNCTIONS} functions on a per-second schedule, fire-time lateness",
        {"functions": FUNCTIONS, "schedule": SCHEDULE, "seconds": seconds, "inflight": o.inflight},
        targets=[Target("p99 lateness ≤ 100 ms at 1,000 fires/s (issue 13)", "at_most", 100.0, "p99_ms")],
    )
    receiver = Receiver()
    await receiver.start()
    try:

        async def fastconn(ctx: Context, receiver: Receiver) -> Running:
            return await start_daemon(ctx, _config(ctx, receiver))

        systems: list[System] = [
            CronSystem("fastconn", "fastconn daemon (cron source)", receiver, fastconn, seconds),
            CronSystem(
                "baseline",
                f"croniter + aiohttp, task per function ({o.inflight} in flight)",
                receiver,
                start_baseline,
                seconds,
            ),
        ]
        return [await alternate(ctx, result, systems)]
    finally:
        await receiver.close()


async def start_baseline(ctx: Context, receiver: Receiver) -> Running:
    """``python -m scenarios._cron_baseline`` from ``benches/``; it prints ``ready`` once scheduled."""
    log_path = ctx.options.workdir / "pipeline-cron.log"
    argv = [
        sys.executable,
        "-m",
        "scenarios._cron_baseline",
        "--sink",
        receiver.url,
        "--inflight",
        str(ctx.options.inflight),
        "--functions",
        str(FUNCTIONS),
        "--schedule",
        SCHEDULE,
    ]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=BENCHES, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    running = RunningPipeline(process, log_path, "")
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await running.stop()
        raise RuntimeError(f"cron baseline did not start:\n{running.output()}")
    return running
