"""``fanout``: core NATS, one message to 3 functions (3 calls per message, acknowledged once
every call answered). Rates are in source messages; the ceiling is wrk's rate ÷ 3."""

from __future__ import annotations

from scenarios._base import Context, ScenarioResult
from scenarios.nats import run_nats

FUNCTIONS = 3


async def run(ctx: Context) -> list[ScenarioResult]:
    return [await run_nats(ctx, "fanout", f"core NATS → {FUNCTIONS} functions (fan-out)", FUNCTIONS, [])]
