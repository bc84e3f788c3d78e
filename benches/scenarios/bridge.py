"""``bridge``: the asyncio↔tokio bridge micro-benchmark (``benches/bridge.py``) as a suite
scenario: uvloop and asyncio rounds alternating, each in a fresh interpreter. Its figures go
to a table of their own (µs per batch, loop lag); ``rate`` is messages/s at batches of 1000."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import bridge as micro
from scenarios._base import Context, Role, Sample, ScenarioResult, alternate


@dataclass
class BridgeLoop:
    role: Role
    label: str

    async def round(self, ctx: Context) -> Sample:
        seconds = 0.3 if ctx.options.quick else 1.0
        result = await asyncio.to_thread(micro.run_round, self.role, seconds)
        largest = max(micro.BATCHES)
        keep = ("us_", "lag99_", "lagmax_", "submit_", "drain_")
        extra = {k: float(v) for k, v in result.items() if k.startswith(keep)}
        return Sample(rate=result[f"mps_{largest}"], messages=0, extra=extra)


async def run(ctx: Context) -> list[ScenarioResult]:
    result = ScenarioResult(
        "bridge",
        "asyncio↔tokio bridge alone (no HTTP: unrouted messages)",
        {"batches": list(micro.BATCHES)},
    )
    await alternate(ctx, result, [BridgeLoop(loop, loop) for loop in micro.LOOPS])
    idle = {loop: result.systems[loop].median("lag99_idle") for loop in result.systems}
    result.notes.append(
        "idle-loop lag p99 (timer noise included in every lag figure): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in idle.items() if v is not None)
    )
    return [result]
