"""``dispatch``: the bridge and the Rust dispatcher alone (no source, no daemon): a process
submits N messages to a ``Dispatcher`` against a plain aiohttp client with the same in-flight
bound, and the wrk ceiling. The workers are ``benches/dispatch.py``'s."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import dispatch as worker
from _common import run_worker
from scenarios._base import Context, Role, Sample, ScenarioResult, System, Target, alternate
from scenarios._wrk import WrkCeiling


@dataclass
class DispatchWorker:
    """One round: ``benches/dispatch.py --worker <kind>`` in a fresh interpreter."""

    role: Role
    label: str
    kind: str
    messages: int
    payload: int
    inflight: int
    probe: bool = True
    https: bool = False
    """Send to the sink's https side (``ctx.sink.tls_url``), trusting its private CA."""

    async def round(self, ctx: Context) -> Sample:
        o = ctx.options
        if self.https and not (ctx.sink.tls_url and ctx.sink.ca_file):
            raise RuntimeError("an https round needs a sink started with tls=True")
        args = worker.worker_args(
            self.kind,
            ctx.sink.url,
            self.messages,
            self.payload,
            self.inflight,
            o.probe_messages if self.probe else 0,
            o.probe_rate,
            ctx.sink.tls_url if self.https else None,
            ctx.sink.ca_file if self.https else None,
        )
        result = await asyncio.to_thread(run_worker, worker.SCRIPT, args)
        received = await ctx.sink.count()
        if received != self.messages:
            raise RuntimeError(f"the sink received {received:,} of {self.messages:,} messages")
        return Sample(
            rate=result["rate"],
            messages=self.messages,
            p50_ms=result["p50_ms"],
            p99_ms=result["p99_ms"],
            cpu_per_100k=result["cpu_s"] / self.messages * 1e5,
            rss_mb=result["rss_mb"],
            extra={
                "loop_busy": result["loop_cpu_s"] / result["seconds"],
                "native_busy": max(0.0, result["cpu_s"] - result["loop_cpu_s"]) / result["seconds"],
            },
        )


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "dispatch",
        "dispatch only (bridge + Rust dispatcher)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        targets=[
            Target("≥ 6x aiohttp (issue 2)", "ratio_baseline", 6.0),
            Target("≥ 0.6x the ceiling (issue 6)", "ratio_ceiling", 0.6),
        ],
    )
    systems: list[System] = [
        DispatchWorker(
            "fastconn", "fastconn Dispatcher, in process", "fastconn", o.messages, o.payload, o.inflight
        ),
        DispatchWorker(
            "baseline",
            f"aiohttp TCPConnector(limit={o.inflight}), uvloop",
            "aiohttp",
            o.messages,
            o.payload,
            o.inflight,
        ),
        WrkCeiling(o.payload, o.inflight),
    ]
    return [await alternate(ctx, result, systems)]
