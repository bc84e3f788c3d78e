"""``scaling``: how cost grows with work. The dispatch path (bridge + Rust dispatcher, no
source) at payloads of 100 B, 1 KiB and 64 KiB (``--inflight`` in flight) and at 1, 16, 64
and 256 in flight (100 B), each against the wrk ceiling with the same payload and number of
connections. Message counts shrink where a round would otherwise take long (large payloads:
at most 256 MiB per round; one in flight: an eighth) without changing what is measured."""

from __future__ import annotations

from scenarios._base import Context, ScenarioResult, System, alternate
from scenarios._wrk import WrkCeiling
from scenarios.dispatch import DispatchWorker

PAYLOADS = (100, 1024, 65536)
INFLIGHTS = (1, 16, 64, 256)


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def configs(inflight: int) -> list[tuple[int, int]]:
    points = [(payload, inflight) for payload in PAYLOADS]
    points += [(100, k) for k in INFLIGHTS if (100, k) not in points]
    return points


def message_count(messages: int, payload: int, inflight: int, quick: bool) -> int:
    budget = (32 if quick else 256) << 20
    n = min(messages, budget // payload)
    if inflight == 1:
        n //= 8
    return max(n, 200)


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    results = []
    for payload, inflight in configs(o.inflight):
        n = message_count(o.messages, payload, inflight, o.quick)
        result = ScenarioResult(
            "scaling",
            f"dispatch at {_size(payload)}, {inflight} in flight",
            {"messages": n, "payload": payload, "inflight": inflight},
        )
        systems: list[System] = [
            DispatchWorker(
                "fastconn", "fastconn Dispatcher, in process", "fastconn", n, payload, inflight, False
            ),
            WrkCeiling(payload, inflight),
        ]
        results.append(await alternate(ctx, result, systems))
    return results
