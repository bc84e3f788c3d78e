"""The processes a round measures, started fresh every round: the fastconn daemon (as users
run it: ``python -m fastconn run --config``) and a baseline pipeline script. Both expose a
pid (CPU and peak RSS come from /proc) and, for HTTP sources, the URL they accept events at.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from _common import proc_peak_rss_mb
from fastconn.testing import DaemonProcess, free_port
from scenarios._base import (
    Context,
    Role,
    Sample,
    Window,
    delivery_window,
    latency_probe,
    verify_exact,
    warm_up,
)

BENCHES = Path(__file__).resolve().parent.parent
_round_ids = itertools.count(1)


class Running(Protocol):
    pid: int
    url: str
    """Where the process accepts HTTP events (the webhook scenario), else empty."""

    async def accepted(self) -> int:
        """Events the process has accepted (webhook: what the sink must receive)."""
        ...

    async def stop(self) -> None: ...


class RunningDaemon:
    def __init__(self, daemon: DaemonProcess, intake: str = "") -> None:
        self.daemon = daemon
        assert daemon.process is not None
        self.pid = daemon.process.pid
        self.url = daemon.url
        self.intake = intake
        """Count only this source's received messages (one event passes through two sources
        when a webhook stores it and a JetStream source dispatches it)."""

    async def accepted(self) -> int:
        samples = await self.daemon.metrics()
        want = f'source="{self.intake}"' if self.intake else ""
        return int(
            sum(
                v
                for k, v in samples.items()
                if k.startswith("fastconn_messages_received_total") and want in k
            )
        )

    async def stop(self) -> None:
        code = await self.daemon.stop(timeout=20)
        if code != 0:
            raise RuntimeError(f"fastconn exited with {code}:\n{self.daemon.output()[-3000:]}")


async def start_daemon(ctx: Context, config: dict[str, Any], intake: str = "") -> RunningDaemon:
    """The daemon, started; ``intake``: the source whose received count is "accepted"."""
    daemon = DaemonProcess(config, ctx.options.workdir)
    await daemon.start(timeout=30)
    return RunningDaemon(daemon, intake)


def daemon_config(
    ctx: Context, topics: list[str], sources: list[dict[str, Any]], fanout: int = 1
) -> dict[str, Any]:
    """``fanout`` static functions (no gateway) on ``topics``, served by the sink."""
    functions = [{"name": f"f{i}", "url": ctx.function_url(f"f{i}"), "topics": topics} for i in range(fanout)]
    return bounded_daemon_config(ctx, functions, sources)


def bounded_daemon_config(
    ctx: Context, functions: list[dict[str, Any]], sources: list[dict[str, Any]]
) -> dict[str, Any]:
    """The daemon's configuration with these static functions, bounded like the baselines: at
    most ``inflight`` calls on the wire in total."""
    inflight = ctx.options.inflight
    return {
        "log_level": "warning",
        "dispatch": {
            "max_inflight": inflight,
            "max_inflight_per_function": inflight,
            "shutdown_timeout": "5s",
        },
        "functions": functions,
        "sources": sources,
    }


class RunningPipeline:
    """``python -m scenarios._pipelines KIND ...`` from ``benches/`` (so ``import nats`` finds
    nats-py, not a scenario module); it prints ``ready`` once it consumes."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, url: str) -> None:
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self.url = url

    async def accepted(self) -> int:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/count") as r:
            return int(await r.text())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def start_pipeline(ctx: Context, kind: str, args: list[str]) -> RunningPipeline:
    port = free_port()
    argv = [kind, "--sink", ctx.sink.url, "--inflight", str(ctx.options.inflight), "--port", str(port), *args]
    return await start_baseline_script(
        ctx,
        "_pipelines",
        argv,
        log_name=f"pipeline-{kind}",
        what=f"baseline {kind}",
        url=f"http://127.0.0.1:{port}",
    )


async def start_baseline_script(
    ctx: Context, module: str, args: list[str], *, log_name: str, what: str, url: str = ""
) -> RunningPipeline:
    """``python -m scenarios.<module> ARGS`` from ``benches/``, once it printed ``ready``; its
    stderr goes to ``<log_name>.log`` in the workdir, and ``what`` names it if it does not start."""
    log_path = ctx.options.workdir / f"{log_name}.log"
    argv = [sys.executable, "-m", f"scenarios.{module}", *args]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=BENCHES, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    running = RunningPipeline(process, log_path, url)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await running.stop()
        raise RuntimeError(f"{what} did not start:\n{running.output()}")
    return running


class Feed(Protocol):
    """How a scenario puts messages in front of the process under test."""

    fanout: int

    async def prepare_round(self, ctx: Context, round_id: int) -> None: ...

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        """Delivers the scenario's messages; returns the window and the excess at the sink."""
        ...

    async def probe(self, n: int, rate: float) -> None: ...


class Publisher(Protocol):
    """A raw-protocol publisher of a broker scenario (NATS, MQTT)."""

    async def burst(self, subject: str, n: int, size: int) -> None: ...

    async def paced(self, subject: str, n: int, size: int, rate: float) -> None: ...


@dataclass
class PublisherFeed:
    """A broker that drops what nobody subscribes to yet: warm up until the process receives,
    then a burst of ``messages`` (each reaching ``fanout`` functions) and a paced probe."""

    publisher: Publisher
    subject: str
    payload: int
    messages: int
    fanout: int = 1

    async def prepare_round(self, ctx: Context, round_id: int) -> None:
        pass

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        await warm_up(ctx, lambda: self.publisher.burst(self.subject, 1, self.payload))
        n = self.messages
        window = await delivery_window(
            ctx,
            n * self.fanout,
            process.pid,
            start=lambda: self.publisher.burst(self.subject, n, self.payload),
            per_message=self.fanout,
        )
        return window, await verify_exact(ctx, n * self.fanout)

    async def probe(self, n: int, rate: float) -> None:
        await self.publisher.paced(self.subject, n, self.payload, rate)


Launcher = Callable[[Context, int], Awaitable[Running]]


@dataclass
class ProcessSystem:
    """One round = a fresh process: start, throughput window, latency probe, peak RSS, stop."""

    role: Role
    label: str
    feed: Feed
    launch: Launcher

    async def round(self, ctx: Context) -> Sample:
        round_id = next(_round_ids)
        await self.feed.prepare_round(ctx, round_id)
        await ctx.sink.reset()
        process = await self.launch(ctx, round_id)
        try:
            window, excess = await self.feed.throughput(ctx, process)
            p50, p99 = await latency_probe(ctx, self.feed.probe, self.feed.fanout)
            rss = proc_peak_rss_mb(process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                await process.stop()
        extra = {**window.busy, **({"duplicates": float(excess)} if excess else {})}
        return Sample(window.rate, window.messages, p50, p99, window.cpu_per_100k(), rss, extra)
