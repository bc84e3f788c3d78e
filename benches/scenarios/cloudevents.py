"""``cloudevents``: CloudEvents over HTTP → function, in binary mode (``ce-*`` headers, the payload
as the body) and structured mode (one JSON object), driven by wrk like ``webhook``. fastconn's
``type = "cloudevents"`` route decodes and validates every event, publishes it to its ``type``
and submits it; the baselines are the webhook scenario's aiohttp relay and nginx reverse proxy,
which forward the same request's body without decoding the event (less work than fastconn
does, so the ratio is conservative). The window ends when the sink has every accepted event."""

from __future__ import annotations

import json

from scenarios._base import Context, ScenarioResult, System, alternate, http_bound_messages
from scenarios._nginx import start_nginx
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon, start_pipeline
from scenarios._wrk import WrkCeiling
from scenarios.webhook import TOPIC, WebhookFeed

_ATTRIBUTES = {"specversion": "1.0", "id": "bench-1", "source": "/bench", "type": TOPIC}


def binary(payload: bytes) -> tuple[dict[str, str], bytes]:
    headers = {f"ce-{name}": value for name, value in _ATTRIBUTES.items()}
    return {**headers, "Content-Type": "text/plain"}, payload


def structured(payload: bytes) -> tuple[dict[str, str], bytes]:
    # Text data in a JSON string: functions (binary delivery) get the payload bytes back.
    event = {**_ATTRIBUTES, "datacontenttype": "text/plain", "data": payload.decode()}
    return {"Content-Type": "application/cloudevents+json"}, json.dumps(event).encode()


async def _mode(ctx: Context, mode: str) -> ScenarioResult:
    o = ctx.options
    encode = binary if mode == "binary" else structured
    result = ScenarioResult(
        f"cloudevents-{mode}",
        f"CloudEvents HTTP ({mode} mode) → function",
        {"messages": http_bound_messages(o.messages), "payload": o.payload, "inflight": o.inflight},
    )
    fastconn_feed = WebhookFeed(o.payload, path="/cloudevents", encode=encode)
    relay_feed = WebhookFeed(o.payload, encode=encode)

    async def fastconn(ctx: Context, _round: int) -> Running:
        return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [{"type": "cloudevents"}]))

    async def baseline(ctx: Context, _round: int) -> Running:
        return await start_pipeline(ctx, "webhook", [])

    async def nginx(ctx: Context, _round: int) -> Running:
        return await start_nginx(ctx, ctx.function_url("f0"))

    systems: list[System] = [
        ProcessSystem("fastconn", f"fastconn daemon (cloudevents source, {mode})", fastconn_feed, fastconn),
        ProcessSystem(
            "baseline",
            f"aiohttp relay + aiohttp client ({o.inflight} in flight), body not decoded",
            relay_feed,
            baseline,
        ),
        ProcessSystem("nginx", "nginx reverse proxy (2 workers, keep-alive upstream)", relay_feed, nginx),
        WrkCeiling(o.payload, o.inflight),
    ]
    await alternate(ctx, result, systems)
    nginx_ratio = result.ratio("nginx")
    if nginx_ratio is not None:
        result.notes.append(f"fastconn = {nginx_ratio:.2f}x nginx (relaying undecoded) in the same run")
    if any(fastconn_feed.refused):
        result.notes.append(f"fastconn 503 answers (backpressure) per round: {fastconn_feed.refused}")
    return result


async def run(ctx: Context) -> list[ScenarioResult]:
    return [await _mode(ctx, "binary"), await _mode(ctx, "structured")]
