"""Dispatch benchmark: N messages through the asyncio bridge and the Rust dispatcher to the
counting sink with 64 in flight, against a plain aiohttp client (TCPConnector(limit=64),
uvloop) in the same run, rounds alternating A B A B. Prints messages/s, the ratio, and checks
the sink received every message.

    python benches/dispatch.py [--messages 200000] [--payload 100] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, Sink, environment, run_worker


def args_workers() -> int:
    import os

    return int(os.environ.get("FASTCONN_BENCH_WORKERS", "2"))


def payload(size: int) -> bytes:
    return (b"x" * size)[:size]


async def fastconn_worker(url: str, n: int, size: int, inflight: int) -> dict[str, float]:
    from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Outcome

    body = payload(size)
    messages = [Message("bench", body) for _ in range(n)]
    done = asyncio.get_running_loop().create_future()
    count = 0
    failed = 0

    def settle(outcomes: list[Outcome]) -> None:
        nonlocal count, failed
        count += len(outcomes)
        failed += sum(1 for o in outcomes if not o.ok)
        if count >= n and not done.done():
            done.set_result(None)

    options = DispatchOptions(
        workers=args_workers(),
        max_inflight=inflight,
        max_inflight_per_function=inflight,
        batch_size=512,
        max_queued=max(4 * inflight, 2048),
    )
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions([FunctionTarget("sink", ("bench",), f"{url}/function/sink")])
        started = time.perf_counter()
        await dispatcher.submit(messages, settle)
        await done
        elapsed = time.perf_counter() - started
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed, "failed": failed}


async def aiohttp_worker(url: str, n: int, size: int, inflight: int) -> dict[str, float]:
    import aiohttp

    body = payload(size)
    remaining = n
    failed = 0

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight)) as http:

        async def worker() -> None:
            nonlocal remaining, failed
            while remaining > 0:
                remaining -= 1
                async with http.post(
                    f"{url}/function/sink",
                    data=body,
                    headers={"Content-Type": "text/plain", "X-Topic": "bench"},
                ) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - started
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed, "failed": failed}


def worker_main(args: argparse.Namespace) -> None:
    import uvloop

    fn = fastconn_worker if args.worker == "fastconn" else aiohttp_worker
    result = uvloop.run(fn(args.url, args.messages, args.payload, args.inflight))
    print(json.dumps(result))


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
                sink.reset()
                result = run_worker(
                    Path(__file__),
                    [
                        "--worker",
                        name,
                        "--url",
                        sink.url,
                        "--messages",
                        str(args.messages),
                        "--payload",
                        str(args.payload),
                        "--inflight",
                        str(args.inflight),
                    ],
                )
                received = sink.stats()["requests"]
                if received != args.messages or result["failed"]:
                    print(
                        f"FAIL: {name} round {round_no}: sink received {received} of {args.messages} "
                        f"({result['failed']} failed)"
                    )
                    return 1
                figures[name].values.append(result["rate"])
                cpu[name].values.append(result["process_cpu_s"] / args.messages * 1e5)
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
