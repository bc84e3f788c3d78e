"""``vcenter``: vSphere events from govmomi's simulator (``tests/vcsim/main.go``, plain HTTP) to a
function. fastconn's daemon (vcenter source) against the naive pyvmomi poller
(``_vcenter_baseline``: a collector's latest page polled in a thread, pyVmomi's JSON encoder,
aiohttp), same poll interval (50 ms), same in-flight bound.

* **Throughput**: a backlog of ``EventEx`` events (at most 900: the simulator keeps its newest
  1,000) is posted before the process starts, with the start just before it (fastconn: a
  checkpoint file; the baseline: ``--after-key``); the window runs from the process being ready
  (logged in, nothing read yet) to the last delivery. fastconn reads the backlog with its
  catch-up (``QueryEvents``), the baseline with its 1,000-event page (it has no catch-up, so it
  needs a page as large as the backlog); fastconn's tail page is the default 100.
* **Latency**: with the process running, one VM is powered off and on, one change at a time; each
  sample is the time from the ``PowerOffVM_Task``/``PowerOnVM_Task`` call (which returns once the
  task is queued) to the function call seen at the sink (polled every 2 ms).
* **Where the time goes** (fastconn's figures, measured in the bench process on the same
  backlog): the vSphere read (``QueryEvents``: SOAP over HTTP and pyvmomi's XML parsing), the
  conversion to JSON, and the rest (dispatch, HTTP calls).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from _common import proc_peak_rss_mb
from fastconn.sources.vcenter.client import VcenterSession
from fastconn.sources.vcenter.config import VcenterConfig
from fastconn.sources.vcenter.events import event_json
from fastconn.testing_vcsim import Vcsim, VcsimDriver, driver
from scenarios._base import Context, Role, Sample, ScenarioResult, System, alternate, delivery_window
from scenarios._process import Running, daemon_config, start_baseline_script, start_daemon

MAX_BACKLOG = 900
POLL = 0.05
VM = "DC0_H0_VM0"


def _post_backlog(sim: Vcsim, n: int) -> tuple[str, int, str]:
    """Posts ``n`` EventEx events; returns the instance uuid, the key and time just before them."""
    from pyVmomi import vim

    with driver(sim.url) as d:
        instance = str(d.content.about.instanceUuid)
        before, when = _newest(d)
        for i in range(n):
            d.post_event(
                vim.event.EventEx(eventTypeId="com.example.bench", message=f"bench {i}", severity="info")
            )
    return instance, before, when


def _newest(d: VcsimDriver) -> tuple[int, str]:
    from pyVmomi import vim

    spec = vim.event.EventFilterSpec(maxCount=1)
    page = d.content.eventManager.QueryEvents(filter=spec) or []
    newest = max(page, key=lambda e: e.key)
    return int(newest.key), newest.createdTime.isoformat()


async def _nothing() -> None:
    return None


@dataclass
class VcenterSystem:
    role: Role
    label: str
    sim: Vcsim
    workdir: Path
    backlog: int
    latency_samples: int

    async def round(self, ctx: Context) -> Sample:
        await ctx.sink.reset()
        instance, before, when = await asyncio.to_thread(_post_backlog, self.sim, self.backlog)
        process = await self._start(ctx, instance, before, when)
        try:
            # The window opens once the process is ready (logged in, before its first read), so
            # the backlog's read from vCenter is measured, not only the calls after it.
            window = await delivery_window(ctx, self.backlog, process.pid, start=_nothing)
            p50, p99 = await self._latency(ctx)
            rss = proc_peak_rss_mb(process.pid)
        finally:
            await process.stop()
        extra = dict(window.busy)
        return Sample(window.rate, window.messages, p50, p99, window.cpu_per_100k(), rss, extra)

    async def _start(self, ctx: Context, instance: str, before: int, when: str) -> Running:
        if self.role == "fastconn":
            state = self.workdir / f"vcenter-{time.monotonic_ns()}.checkpoint"
            state.write_text(json.dumps({"instance": instance, "key": before, "time": when}))
            source = {
                "type": "vcenter",
                "url": self.sim.url,
                "username": "bench",
                "password": "bench",
                "poll_interval": POLL,
                "checkpoint": {"type": "file", "path": str(state)},
            }
            topics = ["com.example.bench", "vm.powered.*"]
            return await start_daemon(ctx, daemon_config(ctx, topics, [source]))
        return await start_baseline(ctx, self.sim.url, before)

    async def _latency(self, ctx: Context) -> tuple[float | None, float | None]:
        """Power changes one at a time; each sample from the call to the sink's count moving."""
        await asyncio.sleep(0.3)  # the backlog's stragglers
        samples: list[float] = []
        with driver(self.sim.url) as d:
            vm = d.vm(VM)
            for i in range(self.latency_samples):
                seen = await ctx.sink.count()
                method = vm.PowerOffVM_Task if i % 2 == 0 else vm.PowerOnVM_Task
                t0 = time.perf_counter()
                task = await asyncio.to_thread(method)  # the call returns once the task is queued
                while await ctx.sink.count() == seen:
                    await asyncio.sleep(0.002)
                samples.append((time.perf_counter() - t0) * 1e3)
                await asyncio.to_thread(VcsimDriver._wait, task)
                # a power-on also records VmStartingEvent: let it pass before the next sample
                await asyncio.sleep(0.1)
            if self.latency_samples % 2:
                await asyncio.to_thread(lambda: VcsimDriver._wait(vm.PowerOnVM_Task()))
        if not samples:
            return None, None
        ordered = sorted(samples)
        return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def start_baseline(ctx: Context, url: str, after_key: int) -> Running:
    args = [
        "--sink",
        ctx.sink.url,
        "--url",
        url,
        "--inflight",
        str(ctx.options.inflight),
        "--after-key",
        str(after_key),
        "--poll",
        str(POLL),
    ]
    return await start_baseline_script(
        ctx, "_vcenter_baseline", args, log_name="pipeline-vcenter", what="vcenter baseline"
    )


def _breakdown(sim: Vcsim, n: int) -> dict[str, float]:
    """fastconn's read and conversion of ``n`` events, in ms per 1,000 events (best of 3)."""
    _, before, _ = _post_backlog(sim, n)
    config = VcenterConfig(
        url=sim.url, username="bench", password="bench", page_size=1000, event_types=("EventEx",)
    )
    session = VcenterSession(config, "bench", "bench")
    session.connect()
    try:
        reads, converts = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            events = session.read_since(None, before, 1000, 1000)
            t1 = time.perf_counter()
            bodies = [orjson.dumps(event_json(e)) for e in events]
            t2 = time.perf_counter()
            assert len(bodies) == n, f"read {len(bodies)} of {n}"
            reads.append(t1 - t0)
            converts.append(t2 - t1)
    finally:
        session.close()
    return {"read_ms_per_1k": min(reads) / n * 1e6, "convert_ms_per_1k": min(converts) / n * 1e6}


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    backlog = min(o.messages, MAX_BACKLOG)
    samples = 10 if o.quick else 40
    result = ScenarioResult(
        "vcenter",
        "vCenter events (govmomi simulator) → function: backlog rate, power change → call latency",
        {
            "backlog": backlog,
            "inflight": o.inflight,
            "poll_interval_ms": POLL * 1e3,
            "latency_samples": samples,
        },
    )
    workdir = o.workdir / "vcenter"
    workdir.mkdir(parents=True, exist_ok=True)
    sim = await asyncio.to_thread(Vcsim, workdir)
    try:
        systems: list[System] = [
            VcenterSystem("fastconn", "fastconn daemon (vcenter source)", sim, workdir, backlog, samples),
            VcenterSystem("baseline", "pyvmomi latestPage poller + aiohttp", sim, workdir, backlog, samples),
        ]
        await alternate(ctx, result, systems)
        parts: dict[str, Any] = await asyncio.to_thread(_breakdown, sim, backlog)
    finally:
        await asyncio.to_thread(sim.stop)
    fastconn = result.systems.get("fastconn")
    rate = fastconn.median("rate") if fastconn else None
    if rate:
        total = 1e6 / rate
        rest = total - parts["read_ms_per_1k"] - parts["convert_ms_per_1k"]
        result.notes.append(
            f"where fastconn's time goes, per 1,000 events: {total:,.0f} ms end to end = vSphere read "
            f"(QueryEvents: SOAP + pyvmomi XML parsing) {parts['read_ms_per_1k']:,.0f} ms + JSON conversion "
            f"{parts['convert_ms_per_1k']:,.0f} ms + the rest (dispatch, HTTP calls, polling) {rest:,.0f} ms"
        )
    result.notes.append(
        f"latency = PowerOff/PowerOnVM_Task call → function call at the sink, {samples} changes one at a "
        f"time, poll interval {POLL * 1e3:.0f} ms for both; the backlog is capped at {MAX_BACKLOG} events "
        "(the simulator keeps its newest 1,000)"
    )
    return [result]
