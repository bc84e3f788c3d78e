"""``https``: the dispatch path over HTTPS against the same path over plain HTTP, at
``--payload`` and at 64 KiB (message counts as in ``scaling``), rounds alternating in one run,
so the ratio (https / http, in the "baseline" column) is the cost of TLS on this machine. Both
go to one counting sink: its plain port and its HTTPS port (rustls, a certificate from a
private CA the dispatcher trusts through ``tls_ca``) share the counters, so the sink and its
build are the same on both sides and only TLS differs.

The sink gets its own process here (with ``tls=True``): the suite's shared sink stays a plain
one, so the other scenarios need no certificate."""

from __future__ import annotations

from _common import Sink
from scenarios._base import Context, ScenarioResult, SinkClient, System, alternate
from scenarios.dispatch import DispatchWorker
from scenarios.scaling import message_count

LARGE = 65536
"""The second point: large bodies, where encryption rather than per-call work dominates."""


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    results = []
    with Sink(tls=True) as sink:
        client = SinkClient(sink)
        here = Context(o, client, dict(ctx.watch))
        try:
            for payload in dict.fromkeys((o.payload, LARGE)):
                n = message_count(o.messages, payload, o.inflight, o.quick)
                result = ScenarioResult(
                    "https",
                    f"dispatch over HTTPS at {payload:,} B (baseline: the same over plain HTTP)",
                    {"messages": n, "payload": payload, "inflight": o.inflight},
                    notes=["ratio = https / http messages/s, same sink process, rounds alternating"],
                )
                systems: list[System] = [
                    DispatchWorker(
                        "fastconn",
                        "fastconn Dispatcher over https (rustls)",
                        "fastconn",
                        n,
                        payload,
                        o.inflight,
                        https=True,
                    ),
                    DispatchWorker(
                        "baseline", "fastconn Dispatcher over plain http", "fastconn", n, payload, o.inflight
                    ),
                ]
                results.append(await alternate(here, result, systems))
        finally:
            await client.close()
    return results
