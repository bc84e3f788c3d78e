"""``nats``: core NATS → function. A raw-protocol publisher floods the subject (it is several
times faster than any consumer here, so the consumer is what is measured); fastconn's daemon
against a nats-py subscriber + aiohttp pipeline with the same in-flight bound, and the wrk
ceiling. ``fanout`` reuses this with one message going to 3 functions."""

from __future__ import annotations

from scenarios._base import (
    Context,
    ScenarioResult,
    System,
    Target,
    alternate,
)
from scenarios._brokers import RawNatsPublisher, nats_server
from scenarios._process import (
    ProcessSystem,
    PublisherFeed,
    Running,
    daemon_config,
    start_daemon,
    start_pipeline,
)
from scenarios._wrk import WrkCeiling

SUBJECT = "bench.events"


async def run_nats(ctx: Context, name: str, title: str, fanout: int, targets: list[Target]) -> ScenarioResult:
    o = ctx.options
    # The same number of calls as without fan-out: a round takes as long, whatever the fan-out.
    messages = o.messages // fanout
    result = ScenarioResult(
        name,
        title,
        {"messages": messages, "payload": o.payload, "inflight": o.inflight, "functions": fanout},
        targets=targets,
    )
    with nats_server(o.workdir, ctx.watch) as url:
        async with RawNatsPublisher(url) as publisher:
            feed = PublisherFeed(publisher, SUBJECT, o.payload, messages, fanout)
            source = {"type": "nats", "servers": [url], "subjects": [SUBJECT]}

            async def fastconn(ctx: Context, _round: int) -> Running:
                return await start_daemon(ctx, daemon_config(ctx, [SUBJECT], [source], fanout))

            async def baseline(ctx: Context, _round: int) -> Running:
                args = ["--server", url, "--subject", SUBJECT, "--fanout", str(fanout)]
                return await start_pipeline(ctx, "nats", args)

            systems: list[System] = [
                ProcessSystem("fastconn", "fastconn daemon (nats source)", feed, fastconn),
                ProcessSystem(
                    "baseline", f"nats-py subscriber + aiohttp ({o.inflight} in flight)", feed, baseline
                ),
                WrkCeiling(o.payload, o.inflight, fanout),
            ]
            return await alternate(ctx, result, systems)


async def run(ctx: Context) -> list[ScenarioResult]:
    targets = [
        Target("≥ 6x nats-py + aiohttp (issues 3, 6)", "ratio_baseline", 6.0),
        Target("≥ 0.5x the ceiling (issue 6)", "ratio_ceiling", 0.5),
    ]
    return [await run_nats(ctx, "nats", "core NATS → function", 1, targets)]
