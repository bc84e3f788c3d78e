"""What every scenario shares: the run's options and sink, the per-round sample, rounds run
alternately across systems (A B C A B C: the machine is shared, so drift hits every system
alike), the delivery window measured at the sink, and the latency probe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp

from _common import Figure, Sink, proc_cpu_seconds

Role = str
"""``fastconn``, ``baseline`` or ``ceiling`` (the bridge micro-benchmark uses its loop names)."""


@dataclass(frozen=True)
class Options:
    messages: int
    payload: int
    inflight: int
    rounds: int
    quick: bool
    wrk_seconds: float
    """How long each ceiling (wrk) round runs."""
    probe_messages: int
    """Messages of the latency probe, sent at ``probe_rate`` (a load every system sustains, so
    the latency is the pipeline's own and not queueing behind a backlog)."""
    probe_rate: float
    stall_seconds: float
    workdir: Path


class SinkClient:
    """The counting sink's control endpoints over one keep-alive connection (polled every
    few milliseconds while a round runs, so it must be cheap)."""

    def __init__(self, sink: Sink) -> None:
        self.url = sink.url
        self.tls_url = sink.tls_url
        """The sink's HTTPS side (same counters), when it has one."""
        self.ca_file = sink.ca_file
        self.pid = sink.process.pid
        self._http: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))
        return self._http

    async def stats(self) -> dict[str, Any]:
        http = await self._session()
        async with http.get(self.url + "/__stats") as r:
            result: dict[str, Any] = await r.json(content_type=None)
            return result

    async def count(self) -> int:
        return int((await self.stats())["requests"])

    async def reset(self) -> None:
        http = await self._session()
        async with http.post(self.url + "/__reset") as r:
            await r.read()

    async def stall(self, ms: int) -> None:
        http = await self._session()
        async with http.post(self.url + f"/__stall?ms={ms}") as r:
            await r.read()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


@dataclass
class Context:
    options: Options
    sink: SinkClient
    watch: dict[str, int] = field(default_factory=dict)
    """Other processes whose CPU a window reports (``broker``), by name."""

    def function_url(self, name: str = "sink") -> str:
        return f"{self.sink.url}/function/{name}"


@dataclass
class Sample:
    """One round of one system."""

    rate: float
    """Messages per second (source messages: a fanned-out message counts once)."""
    messages: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_per_100k: float | None = None
    """CPU seconds of the measured process per 100,000 messages, inside the window only."""
    rss_mb: float | None = None
    """Peak RSS of the measured process (it is fresh each round, so its peak is this round's)."""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class SystemResult:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def figure(self, name: str) -> Figure:
        values = [getattr(s, name) if hasattr(s, name) else s.extra.get(name) for s in self.samples]
        return Figure([float(v) for v in values if v is not None])

    def median(self, name: str) -> float | None:
        figure = self.figure(name)
        return figure.median if figure.values else None


@dataclass(frozen=True)
class Target:
    """A goal from the issues, checked on medians: ``ratio_baseline``/``ratio_ceiling`` at
    least ``value``, or a fastconn figure (``rss_mb``, an ``extra`` key) at most ``value``."""

    text: str
    kind: Literal["ratio_baseline", "ratio_ceiling", "at_most"]
    value: float
    figure: str = ""


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any]
    systems: dict[str, SystemResult] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def ratio(self, other: Role) -> float | None:
        mine, theirs = self.systems.get("fastconn"), self.systems.get(other)
        if mine is None or theirs is None:
            return None
        a, b = mine.median("rate"), theirs.median("rate")
        return a / b if a and b else None

    def target_met(self, target: Target) -> bool | None:
        if target.kind == "ratio_baseline":
            r = self.ratio("baseline")
            return None if r is None else r >= target.value
        if target.kind == "ratio_ceiling":
            r = self.ratio("ceiling")
            return None if r is None else r >= target.value
        fastconn = self.systems.get("fastconn")
        value = fastconn.median(target.figure) if fastconn else None
        return None if value is None else value <= target.value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "title": self.title,
            "params": self.params,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "notes": self.notes,
            "systems": {},
            "ratios": {"baseline": self.ratio("baseline"), "ceiling": self.ratio("ceiling")},
            "targets": [{**asdict(t), "met": self.target_met(t)} for t in self.targets],
        }
        for role, system in self.systems.items():
            names = ["rate", "p50_ms", "p99_ms", "cpu_per_100k", "rss_mb"]
            names += sorted({k for s in system.samples for k in s.extra})
            figures = {n: system.figure(n) for n in names}
            out["systems"][role] = {
                "label": system.label,
                "median": {n: f.median for n, f in figures.items() if f.values},
                "spread": {n: f.spread for n, f in figures.items() if f.values},
                "rounds": [asdict(s) for s in system.samples],
            }
        return out


class System(Protocol):
    """A contender in a scenario: fastconn, a baseline, or the ceiling. It may also have
    ``async setup(ctx)`` (run for all systems at once before the first round) and ``async
    close()`` (after the last)."""

    role: Role
    label: str

    async def round(self, ctx: Context) -> Sample: ...


def progress(text: str) -> None:
    print(text, flush=True)


def describe(sample: Sample) -> str:
    parts = [f"{sample.rate:>9,.0f} msg/s"]
    if sample.p50_ms is not None and sample.p99_ms is not None:
        parts.append(f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:7.2f} ms")
    if sample.cpu_per_100k is not None:
        parts.append(f"{sample.cpu_per_100k:5.2f} CPU s/100k")
    if sample.rss_mb is not None:
        parts.append(f"{sample.rss_mb:5.0f} MB peak")
    # A few extras fit on a progress line; the rest (the bridge's per-batch figures) go to the report.
    shown = list(sample.extra.items())
    parts.extend(f"{k} {v:,.2f}" for k, v in shown[:4])
    if len(shown) > 4:
        parts.append(f"(+{len(shown) - 4} more in the report)")
    return "  ".join(parts)


async def alternate(ctx: Context, result: ScenarioResult, systems: list[System]) -> ScenarioResult:
    """Runs ``ctx.options.rounds`` rounds of every system in turn, collecting samples into
    ``result``; the first failure (a short delivery, a crash) ends the scenario with an error."""
    started = time.perf_counter()
    for system in systems:
        result.systems[system.role] = SystemResult(system.label)
    rounds = ctx.options.rounds
    try:
        await asyncio.gather(*(s.setup(ctx) for s in systems if hasattr(s, "setup")))
        for index in range(1, rounds + 1):
            for system in systems:
                sample = await system.round(ctx)
                result.systems[system.role].samples.append(sample)
                progress(f"  [{result.name}] round {index}/{rounds} {system.role:8s} {describe(sample)}")
    except Exception as exc:  # one broken scenario must not lose the others' results
        result.error = f"{type(exc).__name__}: {exc}"
        progress(f"  [{result.name}] FAILED: {result.error}")
    finally:
        for system in systems:
            if hasattr(system, "close"):
                with contextlib.suppress(Exception):
                    await system.close()
    result.seconds = time.perf_counter() - started
    return result


# -- measuring at the sink ---------------------------------------------------------------------


def thread_split(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread (where the event loop runs) and of everything
    else (tokio workers, and threads that already ended: process total minus main)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    main = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return main, proc_cpu_seconds(pid) - main


class CpuMeter:
    """Where a window's time goes: cores kept busy by the measured process's event loop
    (``loop``) and its other threads (``native``), the broker and the sink. A side near 1.0
    (one core) or the two cores together near 2.0 is the limit."""

    def __init__(self, ctx: Context, pid: int | None) -> None:
        self.pid = pid
        self.others = {**ctx.watch, "sink": ctx.sink.pid}
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        with contextlib.suppress(OSError):
            if self.pid:
                values["loop"], values["native"] = thread_split(self.pid)
            for name, pid in self.others.items():
                values[name] = proc_cpu_seconds(pid)
        return values

    def start(self) -> None:
        self._start = self._read()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        end, seconds = self._read(), time.perf_counter() - self._t0
        if seconds <= 0:
            return {}
        # Clock ticks are 10 ms: a thread with nothing to do can come out a hair below zero.
        return {f"{k}_busy": max(0.0, end[k] - v) / seconds for k, v in self._start.items() if k in end}


@dataclass
class Window:
    seconds: float
    messages: int
    cpu_seconds: float | None
    busy: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def cpu_per_100k(self) -> float | None:
        return None if self.cpu_seconds is None else self.cpu_seconds / self.messages * 1e5


def http_bound_messages(messages: int) -> int:
    """Rounds of scenarios whose every message goes through a Python HTTP server on both sides
    (webhook, async callbacks: ~5k/s here) use a quarter of ``--messages``, so a full run's
    round takes seconds, not a minute; the rate over 10 s is as steady as over 40."""
    return max(1000, messages // 4)


def delivery_timeout(expected: int) -> float:
    """Generous: a pipeline at 1,000 messages/s still finishes; a hang still ends the run."""
    return 30.0 + expected / 1000


async def delivery_window(
    ctx: Context,
    expected: int,
    pid: int | None,
    start: Callable[[], Coroutine[Any, Any, None]] | None = None,
    per_message: int = 1,
    poll: float = 0.005,
    timeout: float | None = None,
) -> Window:
    """Measures how long the sink takes to receive ``expected`` requests, and the CPU ``pid``
    spends meanwhile.

    With ``start`` (live input: a publisher), the window opens when it starts. Without it (a
    backlog the consumer is already working through), the window opens at the first delivery
    seen, so process start-up and consumer-group joins are not counted. ``per_message``: sink
    requests per source message (fan-out), so the window counts messages.
    """
    sink = ctx.sink
    deadline = time.monotonic() + (timeout or delivery_timeout(expected))
    publisher: asyncio.Task[None] | None = None
    first = 0
    if start is None:
        while (first := await sink.count()) == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("nothing reached the sink")
            await asyncio.sleep(poll)
    meter = CpuMeter(ctx, pid)
    meter.start()
    cpu0 = proc_cpu_seconds(pid) if pid else None
    t0 = time.perf_counter()
    if start is not None:
        publisher = asyncio.create_task(start())
    try:
        while (count := await sink.count()) < expected:
            if publisher is not None and publisher.done():
                publisher.result()  # a failed publisher fails the round now
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sink received {count:,} of {expected:,} messages")
            await asyncio.sleep(poll)
        t1 = time.perf_counter()
        cpu1 = proc_cpu_seconds(pid) if pid else None
        busy = meter.stop()
        if publisher is not None:
            await publisher
    finally:
        if publisher is not None and not publisher.done():
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    if first >= expected:
        raise RuntimeError("everything was delivered before the first poll: use more --messages")
    return Window(t1 - t0, (expected - first) // per_message, cpu, busy)


async def warm_up(ctx: Context, send_one: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    """Sends single messages until one reaches the sink (the process has subscribed: core NATS
    does not keep what nobody listens to), then clears the sink for the measurement."""
    deadline = time.monotonic() + timeout
    while True:
        await send_one()
        for _ in range(10):
            await asyncio.sleep(0.02)
            if await ctx.sink.count():
                await asyncio.sleep(0.2)  # let the other warm-up messages land before the reset
                await ctx.sink.reset()
                return
        if time.monotonic() > deadline:
            raise TimeoutError("warm-up: nothing reached the sink")


async def verify_exact(ctx: Context, expected: int, settle: float = 0.3) -> int:
    """After a window: waits briefly for stragglers and fails on a short count; returns the
    excess (duplicates, which at-least-once allows but the report should show)."""
    await asyncio.sleep(settle)
    count = await ctx.sink.count()
    if count < expected:
        raise RuntimeError(f"the sink received {count:,} of {expected:,} messages")
    return count - expected


async def latency_probe(
    ctx: Context, send: Callable[[int, float], Awaitable[None]], fanout: int = 1
) -> tuple[float | None, float | None]:
    """Resets the sink, sends the probe (``send(n, rate)``: stamped messages at a steady
    rate), waits for all of it and returns the sink's p50/p99 in ms."""
    o = ctx.options
    await ctx.sink.reset()
    await send(o.probe_messages, o.probe_rate)
    deadline = time.monotonic() + delivery_timeout(o.probe_messages)
    while (count := await ctx.sink.count()) < o.probe_messages * fanout:
        if time.monotonic() > deadline:
            raise TimeoutError(f"latency probe: the sink received {count} of {o.probe_messages * fanout}")
        await asyncio.sleep(0.01)
    stats = await ctx.sink.stats()
    if not stats.get("latency_samples"):
        return None, None
    return stats["p50"] * 1e3, stats["p99"] * 1e3
