"""Async invocations with callbacks, end to end: messages → ``/async-function/`` (the counting
sink plays the gateway: 202 at once, then a POST to ``X-Callback-Url``) → fastconn's callback
receiver → the message settles. 64 in flight, rounds alternating with plain sync dispatch to the
same sink for reference.

Reports messages settled/s (each one invocation, one 202 and one callback) and the latency
from a message entering the core to its outcome reaching the source, p50/p99. The core owns the
async call end to end (the callback is answered and matched in the core); Python sees one
outcome per message, as for sync calls.

    python benches/async_callbacks.py [--messages 50000] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, Sink, environment, run_worker


async def worker(url: str, n: int, inflight: int, asynchronous: bool) -> dict[str, float]:
    from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Outcome
    from fastconn.callbacks import CallbackSettings
    from fastconn.ingress import Ingress
    from fastconn.testing import free_port

    port = free_port()
    # At most twice `inflight` messages in the core: the latency measured is then the call's
    # (invocation, 202, callback, settle), not time spent queued behind the whole run.
    options = DispatchOptions(
        workers=1, max_inflight=inflight, max_inflight_per_function=inflight, max_queued=2 * inflight
    )
    dispatcher = Dispatcher(options)
    callbacks = dispatcher.enable_callbacks(
        CallbackSettings(public_url=f"http://127.0.0.1:{port}", max_pending=inflight)
    )
    await dispatcher.start()
    # Callbacks arrive at the ingress server in the core, as in the daemon.
    ingress = Ingress(dispatcher, f"127.0.0.1:{port}")
    ingress.add_callbacks(callbacks)
    await ingress.start()
    dispatcher.set_functions(
        [FunctionTarget("fn", ("bench",), f"{url}/function/fn", async_url=f"{url}/async-function/fn")]
    )
    done = asyncio.get_running_loop().create_future()
    settled = 0
    failed = 0
    settle_latency: list[float] = []
    submitted_at: dict[int, float] = {}

    def on_outcomes(outcomes: list[Outcome]) -> None:
        nonlocal settled, failed
        now = time.perf_counter()
        for outcome in outcomes:
            settled += 1
            failed += not outcome.ok
            sent = submitted_at.pop(id(outcome.message), None)
            if sent is not None:
                settle_latency.append(now - sent)
        if settled >= n and not done.done():
            done.set_result(None)

    messages = [Message("bench", b"x" * 100) for _ in range(n)]
    started = time.perf_counter()
    # Batches of `inflight`: the pending bound is the backpressure, as for a source.
    for i in range(0, n, inflight):
        batch = messages[i : i + inflight]
        await dispatcher.submit(batch, on_outcomes, asynchronous=asynchronous)
        entered = time.perf_counter()
        for message in batch:
            submitted_at.setdefault(id(message), entered)
    await done
    elapsed = time.perf_counter() - started
    await ingress.stop()
    await dispatcher.close(5)
    settle_latency.sort()
    pick = lambda p: settle_latency[int(p * (len(settle_latency) - 1))] if settle_latency else 0.0  # noqa: E731
    return {
        "messages": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "failed": failed,
        "settle_p50": pick(0.5),
        "settle_p99": pick(0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["async", "sync"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import uvloop

        result = uvloop.run(worker(args.url, args.messages, args.inflight, args.worker == "async"))
        print(json.dumps(result))
        return 0
    env = environment()
    print(f"# async callbacks: {args.messages} messages, {args.inflight} in flight, {env['cpu']}")
    figures = {"async": Figure([]), "sync": Figure([])}
    p50: list[float] = []
    p99: list[float] = []
    with Sink() as sink:
        for round_no in range(1, args.rounds + 1):
            for mode in ("async", "sync"):
                sink.reset()
                result = run_worker(
                    Path(__file__),
                    [
                        "--worker",
                        mode,
                        "--url",
                        sink.url,
                        "--messages",
                        str(args.messages),
                        "--inflight",
                        str(args.inflight),
                    ],
                )
                received = sink.stats()["requests"]
                if received != args.messages or result["failed"]:
                    print(
                        f"FAIL: {mode}: sink received {received}/{args.messages}, {result['failed']} failed"
                    )
                    return 1
                figures[mode].values.append(result["rate"])
                if mode == "async":
                    p50.append(result["settle_p50"])
                    p99.append(result["settle_p99"])
                print(f"round {round_no} {mode:5s} {result['rate']:>9,.0f} msg/s")
    a, s = figures["async"], figures["sync"]
    print()
    print("| | messages/s (median) | spread |")
    print("|---|---:|---:|")
    print(f"| async: invoke → 202 → callback → settled | {a.median:,.0f} | ±{a.spread:.0%} |")
    print(f"| sync dispatch, same sink (reference) | {s.median:,.0f} | ±{s.spread:.0%} |")
    print(
        f"\ninvocations/s = callbacks/s = {a.median:,.0f} (every invocation is called back once); "
        f"in the core → settled latency p50 {statistics.median(p50) * 1e3:.2f} ms, "
        f"p99 {statistics.median(p99) * 1e3:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
