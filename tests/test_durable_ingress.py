"""Durable HTTP ingress: a webhook with a JetStream ``store`` answers 202 only once the stream
holds the event, and a JetStream source with ``stored_events`` dispatches it by its topic with
the id the 202 carried. Real daemons, a real nats-server, real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from durable_ingress_flood import kill_9_during_a_flood, message_ids
from fastconn.testing import FunctionDouble, wait_for
from nats_fixtures import NatsServer, connected, nats_server, start_nats_server, unique  # noqa: F401

if TYPE_CHECKING:
    from conftest import DaemonFactory


def _config(fn: FunctionDouble, server_url: str, stream: str, subject: str, **store: Any) -> dict[str, Any]:
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s"},
        "functions": [
            {"name": "orders", "url": fn.url("/orders"), "topics": ["orders"]},
            {"name": "audit", "url": fn.url("/audit"), "topics": ["audit log"]},
        ],
        "sources": [
            {
                "type": "webhook",
                "store": {
                    "type": "jetstream",
                    "servers": [server_url],
                    "stream": stream,
                    "subject": subject,
                    "publish_timeout": "1s",
                    **store,
                },
            },
            {
                "type": "jetstream",
                "servers": [server_url],
                "stream": stream,
                "subjects": [subject],
                "stored_events": True,
                "ack_wait": "2s",
                "nak_delay": "100ms",
            },
        ],
    }


async def test_stored_events_reach_their_functions_with_the_id_of_their_202(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    stream, subject = unique("INGRESS"), unique("ingress.")
    daemon = await daemon_factory(_config(function_double, nats_server.url, stream, subject))
    accepted: dict[str, str] = {}
    for i, topic in enumerate(["orders", "audit log", "orders", "nobody"]):
        async with http.post(
            f"{daemon.url}/webhook/{topic}", data=f"event {i}".encode(), headers={"X-Shop": "7"}
        ) as r:
            assert r.status == 202, await r.text()
            accepted[r.headers["X-Message-Id"]] = topic
    await wait_for(lambda: len(function_double.calls) == 3, 10, what="the three routed events")
    assert sorted(message_ids(function_double, "/orders")) == sorted(
        i for i, t in accepted.items() if t == "orders"
    )
    (audit,) = function_double.calls_to("/audit")
    assert accepted[audit.headers["X-Message-Id"]] == "audit log"
    assert audit.body == b"event 1"
    assert audit.headers["X-Shop"] == "7"
    assert audit.headers["X-Topic"] == "audit log"
    assert "Fastconn-Topic" not in audit.headers and "Nats-Msg-Id" not in audit.headers
    async with connected(nats_server.url) as nc:  # the stream holds every accepted event
        info = await nc.jetstream().stream_info(stream)
        assert info.state.messages == 4
    async with http.post(f"{daemon.url}/webhook/orders?wait=true", data=b"x") as r:
        assert r.status == 400
        assert "store" in (await r.json())["error"]


async def test_a_store_that_cannot_acknowledge_answers_503(
    tmp_path: Path,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    server = start_nats_server(tmp_path / "nats")
    stream, subject = unique("INGRESS"), unique("ingress.")
    try:
        daemon = await daemon_factory(_config(function_double, server.url, stream, subject))
        async with http.post(f"{daemon.url}/webhook/orders", data=b"before") as r:
            assert r.status == 202
        server.stop()
        async with http.post(f"{daemon.url}/webhook/orders", data=b"during") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
        server = start_nats_server(tmp_path / "nats", port=server.port)

        async def stored_again() -> bool:
            async with http.post(f"{daemon.url}/webhook/orders", data=b"after") as r:
                return r.status == 202

        await wait_for(stored_again, 20, 0.2, "the store to take events again")
        await wait_for(
            lambda: {c.body for c in function_double.calls_to("/orders")} >= {b"before", b"after"},
            20,
            what="both stored events delivered",
        )
        # "during" got a 503: it may still have been stored (an ack lost on the way), so the
        # sender's retry can make it arrive twice; what is guaranteed is the 202s above.
    finally:
        server.stop()


async def test_a_stream_that_does_not_capture_the_subject_is_a_clear_start_error(
    nats_server: NatsServer, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    stream = unique("OTHER")
    async with connected(nats_server.url) as nc:
        await nc.jetstream().add_stream(name=stream, subjects=[unique("elsewhere.")])
    config = _config(function_double, nats_server.url, stream, unique("ingress."), create_stream=False)
    daemon = await daemon_factory(config, wait=None)
    code = await asyncio.wait_for(asyncio.to_thread(daemon.process.wait), 30)  # type: ignore[union-attr]
    assert code != 0
    assert "does not capture" in daemon.output() and "Traceback" not in daemon.output()


@pytest.mark.slow
async def test_kill_9_during_a_flood_loses_no_event_that_got_a_202(
    tmp_path: Path,
    nats_server: NatsServer,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    stream, subject = unique("INGRESS"), unique("ingress.")
    config = _config(function_double, nats_server.url, stream, subject)
    # Slower than the flood: most accepted events are only in the stream when the daemon dies.
    function_double.script("/orders", delay=0.5)
    flood = await kill_9_during_a_flood(
        "jetstream", config, function_double, daemon_factory, http, delivery_timeout=60
    )
    # Calls take 0.5 s: the kill caught hundreds mid-call, unacknowledged in the stream; the
    # restarted replica delivering them again proves they came from the stream.
    assert flood.duplicates > 0, "the kill must catch accepted events whose calls had not finished"
