"""``async-callback``: asynchronous invocations end to end: messages → ``/async-function/``
(the counting sink plays the OpenFaaS gateway: 202 at once, then a POST of the result to
``X-Callback-Url``) → fastconn's callback receiver → the message settles. The workers are the
lead's ``benches/async_callbacks.py``; the reference ("baseline") is fastconn's own sync
dispatch to the same sink, so the ratio is what the callback round trip costs. Skipped with a
note when this checkout has no async-callback support."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from _common import run_worker
from scenarios._base import Context, Role, Sample, ScenarioResult, System, alternate, http_bound_messages
from scenarios._wrk import WrkCeiling

WORKER = Path(__file__).resolve().parent.parent / "async_callbacks.py"


def available() -> str | None:
    """Why the scenario cannot run here, or None."""
    if importlib.util.find_spec("fastconn.callbacks") is None:
        return "fastconn.callbacks is not in this checkout"
    if not WORKER.exists():
        return f"{WORKER.name} is missing"
    return None


@dataclass
class CallbackWorker:
    role: Role
    label: str
    mode: str

    async def round(self, ctx: Context) -> Sample:
        o = ctx.options
        n = http_bound_messages(o.messages)
        await ctx.sink.reset()
        args = ["--worker", self.mode, "--url", ctx.sink.url, "--messages", str(n)]
        result = await asyncio.to_thread(run_worker, WORKER, [*args, "--inflight", str(o.inflight)])
        received = await ctx.sink.count()
        if received != n or result["failed"]:
            raise RuntimeError(f"the sink received {received:,} of {n:,} ({result['failed']} failed)")
        # The worker reports no window CPU of its own: this is the whole process, start-up included.
        cpu = result["process_cpu_s"] / n * 1e5
        if self.mode != "async":
            return Sample(rate=result["rate"], messages=n, cpu_per_100k=cpu)
        # This scenario's latency column is message in the core → its outcome at the source.
        p50, p99 = result["settle_p50"] * 1e3, result["settle_p99"] * 1e3
        return Sample(rate=result["rate"], messages=n, p50_ms=p50, p99_ms=p99, cpu_per_100k=cpu)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "async-callback",
        "async invocation → 202 → callback → settled",
        {"messages": http_bound_messages(o.messages), "payload": 100, "inflight": o.inflight},
    )
    missing = available()
    if missing:
        result.notes.append(f"not available: {missing}")
        return [result]
    systems: list[System] = [
        CallbackWorker("fastconn", "fastconn async invocations with callbacks", "async"),
        CallbackWorker("baseline", "fastconn sync dispatch, same sink (reference)", "sync"),
        WrkCeiling(100, o.inflight),
    ]
    await alternate(ctx, result, systems)
    result.notes.append(
        "baseline = fastconn's own sync dispatch (no Python async pipeline to compare with); "
        "CPU includes interpreter start-up (the worker measures no window); p50 / p99 = message in the "
        "core → its outcome at the source (invocation, 202, callback, settle); invocations/s = "
        "callbacks/s (each call is called back once)"
    )
    return [result]
