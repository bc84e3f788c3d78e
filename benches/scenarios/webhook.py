"""``webhook``: HTTP events → function. wrk POSTs N events (as fast as the server answers,
on ``inflight`` connections) to the daemon's ``/webhook/<topic>``; the baselines are an aiohttp
server forwarding with an aiohttp client under the same bound, and an nginx reverse proxy
relaying to the same sink over keep-alive upstream connections (the practical ceiling of a
two-hop relay; it answers after the sink did, fastconn answers 202 first). ``fastconn-signed`` is
the same daemon with a Stripe-signed route (``t=…,v1=…`` checked per request, the scheme that
once needed the Python handler): the price of a signature check. The window ends when the sink
has every event the server accepted (its own count: fastconn's ``received`` metric, the
baseline's ``/count``), so a 503 (refused under backpressure) is not counted as delivered."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from _common import proc_cpu_seconds, stamped_payload
from scenarios._base import (
    Context,
    CpuMeter,
    ScenarioResult,
    System,
    Window,
    alternate,
    delivery_timeout,
    http_bound_messages,
    warm_up,
)
from scenarios._nginx import start_nginx
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline
from scenarios._wrk import WrkCeiling, run_wrk

TOPIC = "bench"
STRIPE_SECRET = "whsec_bench"
STRIPE = {
    "hmac_secret": STRIPE_SECRET,
    "signature_header": "Stripe-Signature",
    "signature_scheme": "stripe",
    "signature_prefix": "v1=",
    # wrk repeats one signed request: its timestamp must stay fresh for the whole run.
    "signature_tolerance": 86400,
}


def stripe_signed(payload: bytes) -> tuple[dict[str, str], bytes]:
    """The payload as Stripe sends it: ``Stripe-Signature: t=<now>,v1=<HMAC of t.body>``."""
    at = int(time.time())
    digest = hmac.new(STRIPE_SECRET.encode(), f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={digest}"}, payload


@dataclass
class WebhookFeed:
    payload: int
    fanout: int = 1
    url: str = ""
    refused: list[int] = field(default_factory=list)
    answer_times: list[float] = field(default_factory=list)
    """Seconds each probe request waited for its answer (the 202), from the last probe."""
    path: str = f"/webhook/{TOPIC}"
    encode: Callable[[bytes], tuple[dict[str, str], bytes]] | None = None
    """The request for a payload (headers, body); None: the payload as the body."""
    ssl: ssl.SSLContext | bool = True
    """How the warm-up and probe requests verify an https server (wrk does not verify)."""

    def request(self, payload: bytes) -> tuple[dict[str, str], bytes]:
        return ({}, payload) if self.encode is None else self.encode(payload)

    async def prepare_round(self, ctx: Context, round_id: int) -> None:
        pass

    async def _post(self, payload: bytes) -> None:
        headers, body = self.request(payload)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl)) as http,
            http.post(self.url, data=body, headers=headers) as r,
        ):
            await r.read()

    @staticmethod
    async def _delivered(ctx: Context, n: int) -> bool:
        return await ctx.sink.count() >= n

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        self.url = f"{process.url}{self.path}"
        headers, body = self.request(b"x" * self.payload)
        await warm_up(ctx, lambda: self._post(b"warm-up"))
        before = await process.accepted()
        n = http_bound_messages(ctx.options.messages)
        meter = CpuMeter(ctx, process.pid)
        meter.start()
        cpu0, t0 = proc_cpu_seconds(process.pid), time.perf_counter()
        result = await run_wrk(
            self.url,
            ctx.options.workdir,
            payload=self.payload,
            connections=ctx.options.inflight,
            seconds=delivery_timeout(n),
            stop_after=n,
            until=lambda: self._delivered(ctx, n),
            headers=headers,
            body=body if self.encode is not None else None,
        )
        accepted = await process.accepted() - before
        deadline = time.monotonic() + 30
        while (count := await ctx.sink.count()) < accepted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink received {count:,} of {accepted:,} accepted events")
            await asyncio.sleep(0.005)
        t1, cpu1, busy = time.perf_counter(), proc_cpu_seconds(process.pid), meter.stop()
        if accepted < n:
            raise RuntimeError(f"wrk got {result.requests:,} answers but the server accepted {accepted:,}")
        self.refused.append(result.errors.get("status", 0))
        await asyncio.sleep(0.3)
        excess = await ctx.sink.count() - accepted
        return Window(t1 - t0, accepted, cpu1 - cpu0, busy), excess

    async def probe(self, n: int, rate: float) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl)) as http:

            async def post() -> None:
                headers, body = self.request(stamped_payload(self.payload))
                t0 = time.perf_counter()
                async with http.post(self.url, data=body, headers=headers) as r:
                    await r.read()
                self.answer_times.append(time.perf_counter() - t0)

            self.answer_times = []
            started = time.perf_counter()
            tasks: list[asyncio.Task[None]] = []
            while len(tasks) < n:
                due = min(n, int((time.perf_counter() - started) * rate) + 1)
                tasks.extend(asyncio.create_task(post()) for _ in range(due - len(tasks)))
                await asyncio.sleep(0.002)
            await asyncio.gather(*tasks)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "webhook",
        "webhook (HTTP POST) → function",
        {"messages": http_bound_messages(o.messages), "payload": o.payload, "inflight": o.inflight},
    )
    feed = WebhookFeed(o.payload)
    signed_feed = WebhookFeed(o.payload, encode=stripe_signed)

    async def fastconn(ctx: Context, _round: int) -> Running:
        return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [{"type": "webhook"}]))

    async def signed(ctx: Context, _round: int) -> Running:
        return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [{"type": "webhook", **STRIPE}]))

    async def baseline(ctx: Context, _round: int) -> Running:
        return await start_pipeline(ctx, "webhook", [])

    async def nginx(ctx: Context, _round: int) -> Running:
        return await start_nginx(ctx, ctx.function_url("f0"))

    systems: list[System] = [
        ProcessSystem("fastconn", "fastconn daemon (webhook source)", feed, fastconn),
        ProcessSystem("fastconn-signed", "fastconn daemon (Stripe-signed webhook)", signed_feed, signed),
        ProcessSystem(
            "baseline", f"aiohttp server + aiohttp client ({o.inflight} in flight)", feed, baseline
        ),
        ProcessSystem("nginx", "nginx reverse proxy (2 workers, keep-alive upstream)", feed, nginx),
        WrkCeiling(o.payload, o.inflight),
    ]
    await alternate(ctx, result, systems)
    nginx_ratio = result.ratio("nginx")
    if nginx_ratio is not None:
        rate = result.systems["nginx"].median("rate")
        result.notes.append(
            f"nginx reverse proxy (2 workers, keep-alive upstream): {rate:,.0f} msg/s; "
            f"fastconn = {nginx_ratio:.2f}x nginx in the same run "
            "(targets: at least 5x the aiohttp relay and 0.5x nginx)"
        )
    rates = {
        role: result.systems[role].median("rate")
        for role in ("fastconn", "fastconn-signed", "baseline")
        if role in result.systems
    }
    if rates.get("fastconn-signed") and rates.get("fastconn") and rates.get("baseline"):
        signed_rate = rates["fastconn-signed"]
        result.notes.append(
            f"Stripe-signed webhook (t=,v1= checked by the core per request): {signed_rate:,.0f} msg/s "
            f"= {signed_rate / rates['fastconn']:.2f}x the unsigned webhook and "
            f"{signed_rate / rates['baseline']:.2f}x the aiohttp relay in the same run"
        )
    if any(feed.refused):
        result.notes.append(
            f"503 answers (refused under backpressure, retried by nobody) per round: {feed.refused}"
        )
    return [result]
