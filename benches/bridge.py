"""Bridge micro-benchmark: the asyncio↔tokio crossing alone. ``fastconn._core.Runtime`` with
no targets, so every message completes as unrouted without any HTTP, and all that is timed is
``submit`` (one FFI call per batch), the tokio side, the eventfd wake-up and ``drain`` (one
FFI call per wake-up). Batch sizes 1/10/100/1000 under asyncio and uvloop, each loop in its
own fresh interpreter, rounds alternating. Reports µs per batch (submit to the last outcome
drained), the submit and drain calls alone, and the event-loop lag a 1 ms ticker sees
meanwhile (how long one crossing holds the loop).

    python benches/bridge.py [--rounds 3] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, run_worker

SCRIPT = Path(__file__).resolve()
BATCHES = (1, 10, 100, 1000)
LOOPS = ("uvloop", "asyncio")
_INDEX_BITS = 20


def new_runtime() -> Any:
    from fastconn import _core

    return _core.Runtime(
        workers=2,
        max_inflight=1024,
        max_inflight_per_function=256,
        max_queued=4096,
        max_attempts=1,
        retry_on=[],
        backoff_initial=0.1,
        backoff_max=1.0,
        timeout=5.0,
        connect_timeout=1.0,
        content_type="text/plain",
        user_agent="fastconn-bench",
        authorization=None,
    )


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure_batch(runtime: Any, size: int, seconds: float) -> dict[str, float]:
    """Batches of ``size`` back to back for ``seconds``, each awaited until fully drained."""
    loop = asyncio.get_running_loop()
    wire: list[tuple[str, bytes, list[tuple[str, str]], str, None, int, int, None, tuple[()]]] = [
        ("bench", b"x" * 100, [], f"id-{i}", None, 1, 0, None, ()) for i in range(size)
    ]
    pending = 0
    done: asyncio.Future[None] | None = None
    drain_us: list[float] = []

    def on_wake() -> None:
        nonlocal pending
        with contextlib.suppress(BlockingIOError):
            os.read(runtime.wake_fd, 8)
        t = time.perf_counter()
        records = runtime.drain()
        drain_us.append((time.perf_counter() - t) * 1e6)
        pending -= len(records)
        if pending <= 0 and done is not None and not done.done():
            done.set_result(None)

    lags: list[float] = []
    ticking = True

    async def ticker() -> None:
        # Asks for 1 ms sleeps; anything beyond is time the loop was busy elsewhere.
        while ticking:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(max(0.0, time.perf_counter() - t - 0.001) * 1e3)

    loop.add_reader(runtime.wake_fd, on_wake)
    tick = asyncio.create_task(ticker())
    submit_us: list[float] = []
    round_trips: list[float] = []
    batch_id = 0
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            batch_id += 1
            done = loop.create_future()
            pending = size
            t = time.perf_counter()
            runtime.submit(batch_id << _INDEX_BITS, wire)
            submit_us.append((time.perf_counter() - t) * 1e6)
            await done
            round_trips.append((time.perf_counter() - t) * 1e6)
    finally:
        ticking = False
        await tick
        loop.remove_reader(runtime.wake_fd)
    return {
        f"us_{size}": statistics.median(round_trips),
        f"submit_{size}": statistics.median(submit_us),
        f"drain_{size}": statistics.median(drain_us) if drain_us else 0.0,
        f"lag99_{size}": percentile(lags, 99),
        f"lagmax_{size}": max(lags, default=0.0),
        f"mps_{size}": size / statistics.median(round_trips) * 1e6,
    }


async def idle_lag(seconds: float) -> dict[str, float]:
    """The ticker on an idle loop: the timer and scheduler noise every lag figure includes."""
    lags: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(max(0.0, time.perf_counter() - t - 0.001) * 1e3)
    return {"lag99_idle": percentile(lags, 99), "lagmax_idle": max(lags, default=0.0)}


async def worker(seconds: float) -> dict[str, float]:
    runtime = new_runtime()
    result: dict[str, float] = await idle_lag(seconds / 2)
    try:
        for size in BATCHES:
            result.update(await measure_batch(runtime, size, seconds))
    finally:
        runtime.close(1.0)
    return result


def run_round(loop_name: str, seconds: float) -> dict[str, float]:
    """One loop's measurements in a fresh interpreter."""
    return run_worker(SCRIPT, ["--worker", loop_name, "--seconds", str(seconds)])


def worker_main(loop_name: str, seconds: float) -> None:
    if loop_name == "uvloop":
        import uvloop

        result = uvloop.run(worker(seconds))
    else:
        result = asyncio.run(worker(seconds))
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per batch size and round")
    parser.add_argument("--worker", choices=LOOPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.seconds)
        return 0
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in LOOPS}
    for index in range(1, args.rounds + 1):
        for name in LOOPS:
            samples[name].append(run_round(name, args.seconds))
            print(f"round {index} {name} done", flush=True)
    for name in LOOPS:
        idle = Figure([s["lag99_idle"] for s in samples[name]]).median
        print(f"{name}: idle loop lag p99 {idle:.2f} ms (timer and scheduler noise)")
    print(
        "\n| batch | loop | µs per batch | µs per message | submit µs | drain µs | lag p99 ms | lag max ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in BATCHES:
        for name in LOOPS:

            def med(key: str, name: str = name) -> float:
                return Figure([s[key] for s in samples[name]]).median

            us = med(f"us_{size}")
            print(
                f"| {size} | {name} | {us:,.1f} | {us / size:,.2f} | {med(f'submit_{size}'):,.1f} "
                f"| {med(f'drain_{size}'):,.1f} | {med(f'lag99_{size}'):.2f} | {med(f'lagmax_{size}'):.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
