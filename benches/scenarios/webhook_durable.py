"""``webhook-durable``: HTTP events → JetStream store → function. The same wrk load as
``webhook`` against a webhook with a JetStream ``store`` (202 only after the stream's
acknowledgement, file storage) and a JetStream source with ``stored_events`` dispatching from
it, in one daemon; compared in the same run with the plain webhook (202 on acceptance, lost on a
crash) and the aiohttp relay. Besides the end-to-end figures it reports how long the sender
waits for its 202 (``ack_p50_ms``/``ack_p99_ms``, from the latency probe's requests): the price
of durability as the sender sees it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from scenarios._base import Context, ScenarioResult, System, Window, alternate, http_bound_messages
from scenarios._brokers import nats_server
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline
from scenarios.webhook import TOPIC, WebhookFeed

STREAM = "INGRESS"
SUBJECT = "fastconn.ingress"


@dataclass
class TimedWebhookFeed(WebhookFeed):
    """A :class:`WebhookFeed` whose probe also times each request's answer (the 202)."""

    _extras: dict[str, float] = field(default_factory=dict)

    async def throughput(self, ctx: Context, process: Running) -> tuple[Window, int]:
        window, excess = await super().throughput(ctx, process)
        self._extras = window.busy  # the sample's extras are read after the probe fills them
        return window, excess

    async def probe(self, n: int, rate: float) -> None:
        await super().probe(n, rate)
        if len(self.answer_times) >= 2:
            cuts = statistics.quantiles(self.answer_times, n=100)
            self._extras["ack_p50_ms"] = cuts[49] * 1000
            self._extras["ack_p99_ms"] = cuts[98] * 1000


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "webhook-durable",
        "webhook → JetStream store (202 after the ack) → function",
        {"messages": http_bound_messages(o.messages), "payload": o.payload, "inflight": o.inflight},
    )
    with nats_server(o.workdir, ctx.watch) as url:
        durable_feed, plain_feed, relay_feed = (TimedWebhookFeed(o.payload) for _ in range(3))
        rounds = iter(range(1_000_000))

        async def durable(ctx: Context, _round: int) -> Running:
            # A stream per round: the next round does not replay this one's events.
            stream, subject = f"{STREAM}{next(rounds)}", f"{SUBJECT}.{_round}"
            store: dict[str, Any] = {
                "type": "jetstream",
                "servers": [url],
                "stream": stream,
                "subject": subject,
            }
            sources: list[dict[str, Any]] = [
                {"type": "webhook", "store": store},
                {
                    "type": "jetstream",
                    "servers": [url],
                    "stream": stream,
                    "subjects": [subject],
                    "stored_events": True,
                },
            ]
            return await start_daemon(ctx, daemon_config(ctx, [TOPIC], sources), intake="webhook")

        async def plain(ctx: Context, _round: int) -> Running:
            return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [{"type": "webhook"}]))

        async def baseline(ctx: Context, _round: int) -> Running:
            return await start_pipeline(ctx, "webhook", [])

        systems: list[System] = [
            ProcessSystem(
                "fastconn", "fastconn webhook with a JetStream store (durable 202)", durable_feed, durable
            ),
            ProcessSystem("fastconn-plain", "fastconn webhook without a store (same run)", plain_feed, plain),
            ProcessSystem(
                "baseline", f"aiohttp server + aiohttp client ({o.inflight} in flight)", relay_feed, baseline
            ),
        ]
        await alternate(ctx, result, systems)
    plain_ratio = result.ratio("fastconn-plain")
    if plain_ratio is not None:
        result.notes.append(f"durable / plain webhook rate in the same run: {plain_ratio:.2f}x")
    return [result]
