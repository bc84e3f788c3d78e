"""``webhook-https``: the ``webhook`` load (wrk POSTs to ``/webhook/<topic>``) against a daemon
whose listener serves HTTPS (``[server] tls_cert`` / ``tls_key``, a certificate from a private
CA made for the run), against the same daemon configuration over plain HTTP in the same run,
rounds alternating: the ratio (https / http, in the "baseline" column) is the cost of
terminating TLS in the core on this machine. wrk keeps its connections open, so the figure is
the steady-state cost of encryption, not of handshakes."""

from __future__ import annotations

import ssl
from typing import Any

import trustme

from scenarios._base import Context, ScenarioResult, System, alternate, http_bound_messages
from scenarios._process import ProcessSystem, Running, daemon_config, start_daemon
from scenarios.webhook import TOPIC, WebhookFeed


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "webhook-https",
        "webhook over HTTPS → function (baseline: the same over plain HTTP)",
        {"messages": http_bound_messages(o.messages), "payload": o.payload, "inflight": o.inflight},
        notes=["ratio = https / http messages/s, same daemon configuration, rounds alternating"],
    )
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = o.workdir / "webhook-https.crt", o.workdir / "webhook-https.key"
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)

    async def https(ctx: Context, _round: int) -> Running:
        config: dict[str, Any] = daemon_config(ctx, [TOPIC], [{"type": "webhook"}])
        config["server"] = {"tls_cert": str(cert), "tls_key": str(key)}
        return await start_daemon(ctx, config)

    async def http(ctx: Context, _round: int) -> Running:
        return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [{"type": "webhook"}]))

    systems: list[System] = [
        ProcessSystem(
            "fastconn",
            "fastconn webhook over https (rustls in the core)",
            WebhookFeed(o.payload, ssl=trusted),
            https,
        ),
        ProcessSystem(
            "baseline", "fastconn webhook over plain http (same run)", WebhookFeed(o.payload), http
        ),
    ]
    await alternate(ctx, result, systems)
    return [result]
