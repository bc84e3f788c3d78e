"""``https``: the dispatch path over HTTPS against the same path over plain HTTP, rounds
alternating in one run, so the ratio (https / http, in the "baseline" column) is the cost of
TLS on this machine. Both go to one counting sink: its plain port and its HTTPS port
(rustls, a certificate from a private CA the dispatcher trusts through ``tls_ca``) share the
counters, so the sink and its build are the same on both sides and only TLS differs.

The sink gets its own process here (with ``tls=True``): the suite's shared sink stays a plain
one, so the other scenarios need no certificate."""

from __future__ import annotations

from _common import Sink
from scenarios._base import Context, ScenarioResult, SinkClient, System, alternate
from scenarios.dispatch import DispatchWorker


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "https",
        "dispatch over HTTPS (baseline: the same over plain HTTP)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        notes=["ratio = https / http messages/s, same sink process, rounds alternating"],
    )
    systems: list[System] = [
        DispatchWorker(
            "fastconn",
            "fastconn Dispatcher over https (rustls)",
            "fastconn",
            o.messages,
            o.payload,
            o.inflight,
            https=True,
        ),
        DispatchWorker(
            "baseline", "fastconn Dispatcher over plain http", "fastconn", o.messages, o.payload, o.inflight
        ),
    ]
    with Sink(tls=True) as sink:
        client = SinkClient(sink)
        try:
            return [await alternate(Context(o, client, dict(ctx.watch)), result, systems)]
        finally:
            await client.close()
