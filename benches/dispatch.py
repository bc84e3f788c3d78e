"""Dispatch benchmark: N messages through the asyncio bridge and the Rust dispatcher to the
counting sink with 64 in flight, against a plain aiohttp client (TCPConnector(limit=64),
uvloop) in the same run, rounds alternating A B A B. Prints messages/s, the ratio, and checks
the sink received every message. (The suite runs the same workers: ``python -m fastconn bench
dispatch``, and ``scaling`` at other payloads and in-flight bounds.)

    python benches/dispatch.py [--messages 200000] [--payload 100] [--inflight 64] [--rounds 3]

Each round is a fresh interpreter that first sends a latency probe (stamped messages at a
steady rate, one submit each) and then the N messages at once; CPU and peak RSS are the
worker's own over the N messages (``getrusage``: every thread, tokio's included).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, Sink, environment, run_worker, stamped_payload

SCRIPT = Path(__file__).resolve()


def args_workers() -> int:
    return int(os.environ.get("FASTCONN_BENCH_WORKERS", "2"))


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SinkControl:
    """The worker resets the sink and reads its latency itself between its two phases."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def call(self, method: str, path: str) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.request(method, self.url + path) as r:
            text = await r.text()
            return json.loads(text) if text.startswith("{") else {}


Send = Callable[[list[bytes]], Coroutine[Any, Any, None]]
"""Delivers payloads and returns once every one was answered; raises on a failure."""


async def paced(send: Send, n: int, size: int, rate: float) -> None:
    """``n`` stamped messages at ``rate`` per second, each sent on its own as its time comes."""
    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    sent = 0
    while sent < n:
        due = min(n, int((time.perf_counter() - started) * rate) + 1)
        tasks.extend(asyncio.create_task(send([stamped_payload(size)])) for _ in range(due - sent))
        sent = due
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)


async def measure(send: Send, args: argparse.Namespace) -> dict[str, Any]:
    sink = SinkControl(args.url)
    p50 = p99 = None
    if args.probe:
        await sink.call("POST", "/__reset")
        await paced(send, args.probe, args.payload, args.probe_rate)
        stats = await sink.call("GET", "/__stats")
        if stats.get("latency_samples"):
            p50, p99 = stats["p50"] * 1e3, stats["p99"] * 1e3
    body = b"x" * args.payload  # unstamped: the throughput phase is not a latency measurement
    # Open the connections before the window: a burst of connects can overflow a listen
    # backlog (the sink's is 128), and a dropped SYN costs a 1 s retransmit inside the window.
    await send([body] * args.inflight)
    await sink.call("POST", "/__reset")
    payloads = [body] * args.messages
    cpu0, loop0, started = cpu_now(), time.thread_time(), time.perf_counter()
    await send(payloads)
    elapsed, cpu = time.perf_counter() - started, cpu_now() - cpu0
    loop_cpu = time.thread_time() - loop0  # this thread runs the event loop; the rest is tokio
    return {
        "messages": args.messages,
        "seconds": elapsed,
        "rate": args.messages / elapsed,
        "cpu_s": cpu,
        "loop_cpu_s": loop_cpu,
        "p50_ms": p50,
        "p99_ms": p99,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def fastconn_worker(args: argparse.Namespace) -> dict[str, Any]:
    from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Outcome

    options = DispatchOptions(
        workers=args_workers(),
        max_inflight=args.inflight,
        max_inflight_per_function=args.inflight,
        batch_size=512,
        max_queued=max(4 * args.inflight, 2048),
    )
    options = dataclasses.replace(options, tls_ca=args.tls_ca)
    target = args.target_url or args.url
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions([FunctionTarget("sink", ("bench",), f"{target}/function/sink")])

        async def send(payloads: list[bytes]) -> None:
            done = asyncio.get_running_loop().create_future()
            count = failed = 0

            def settle(outcomes: list[Outcome]) -> None:
                nonlocal count, failed
                count += len(outcomes)
                failed += sum(1 for o in outcomes if not o.ok)
                if count >= len(payloads) and not done.done():
                    done.set_result(None)

            await dispatcher.submit([Message("bench", p) for p in payloads], settle)
            await done
            if failed:
                raise RuntimeError(f"{failed} message(s) failed")

        return await measure(send, args)


async def aiohttp_worker(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    url = f"{args.url}/function/sink"
    headers = {"Content-Type": "text/plain", "X-Topic": "bench"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.inflight)) as http:

        async def post(body: bytes) -> None:
            async with http.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")

        async def send(payloads: list[bytes]) -> None:
            # As a user would write it: ``inflight`` workers taking from a shared list.
            items = iter(payloads)

            async def worker() -> None:
                for body in items:
                    await post(body)

            await asyncio.gather(*(worker() for _ in range(min(args.inflight, len(payloads)))))

        return await measure(send, args)


def worker_args(
    worker: str,
    url: str,
    messages: int,
    payload: int,
    inflight: int,
    probe: int = 0,
    probe_rate: float = 1000,
    target_url: str | None = None,
    tls_ca: str | None = None,
) -> list[str]:
    """``target_url``: where the messages go when not to ``url`` (the sink's https side; the
    sink is still controlled at ``url``), with ``tls_ca`` to trust it (fastconn worker only)."""
    tls = ["--target-url", target_url, "--tls-ca", tls_ca] if target_url and tls_ca else []
    return [
        *tls,
        "--worker",
        worker,
        "--url",
        url,
        "--messages",
        str(messages),
        "--payload",
        str(payload),
        "--inflight",
        str(inflight),
        "--probe",
        str(probe),
        "--probe-rate",
        str(probe_rate),
    ]


def worker_main(args: argparse.Namespace) -> None:
    import uvloop

    fn = fastconn_worker if args.worker == "fastconn" else aiohttp_worker
    print(json.dumps(uvloop.run(fn(args))))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["fastconn", "aiohttp"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--probe-rate", type=float, default=1000.0, help=argparse.SUPPRESS)
    parser.add_argument("--target-url", help=argparse.SUPPRESS)
    parser.add_argument("--tls-ca", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return 0
    env = environment()
    print(
        f"# dispatch benchmark: {args.messages} x {args.payload} B, {args.inflight} in flight, "
        f"{args.rounds} rounds each, {env['cpu']} ({env['cores']} cores)"
    )
    figures = {"fastconn": Figure([]), "aiohttp": Figure([])}
    cpu = {"fastconn": Figure([]), "aiohttp": Figure([])}
    with Sink() as sink:
        for round_no in range(1, args.rounds + 1):
            for name in ("fastconn", "aiohttp"):
                result = run_worker(
                    SCRIPT, worker_args(name, sink.url, args.messages, args.payload, args.inflight)
                )
                received = sink.stats()["requests"]
                if received != args.messages:
                    print(f"FAIL: {name} round {round_no}: sink received {received} of {args.messages}")
                    return 1
                figures[name].values.append(result["rate"])
                cpu[name].values.append(result["cpu_s"] / args.messages * 1e5)
                print(
                    f"round {round_no} {name:8s} {result['rate']:>10,.0f} msg/s  "
                    f"(sink received {received:,}; {cpu[name].values[-1]:.2f} CPU s per 100k)"
                )
    f, a = figures["fastconn"], figures["aiohttp"]
    print()
    print("| | messages/s (median) | spread | CPU s per 100k msgs |")
    print("|---|---:|---:|---:|")
    print(f"| fastconn | {f.median:,.0f} | ±{f.spread:.0%} | {cpu['fastconn'].median:.2f} |")
    print(f"| aiohttp (limit=64, uvloop) | {a.median:,.0f} | ±{a.spread:.0%} | {cpu['aiohttp'].median:.2f} |")
    print(f"\nratio fastconn / aiohttp: {f.median / a.median:.2f}x (target >= 6x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
