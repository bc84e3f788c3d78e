"""``reply_sink`` of a ``type = "cloudevents"`` source on a running daemon: every reply event a
function answers with is published to NATS / JetStream (asked for by the sender or not), in
structured mode, and read back with the ``cloudevents`` SDK as an independent consumer; a broker
that refuses the publish is counted and logged while the ingress keeps answering."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from nats.aio.msg import Msg

from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from kafka_fixtures import Broker, kafka_broker  # noqa: F401
from nats_fixtures import NatsServer, connected, nats_server, unique  # noqa: F401

if TYPE_CHECKING:
    from conftest import DaemonFactory

BATCH = "application/cloudevents-batch+json"


def sdk_event(n: int, **attributes: Any) -> CloudEvent:
    base: dict[str, Any] = {
        "id": f"evt-{n}",
        "source": "https://github.com/org/repo",
        "type": "com.github.push",
        "time": datetime(2026, 12, 3, 10, 43, 30, tzinfo=UTC),
        "datacontenttype": "application/json",
        "traceid": f"t{n}",  # an extension attribute: it must survive the trip
    }
    base.update(attributes)
    return CloudEvent(attributes=base, data={"n": n})


def config(function_double: FunctionDouble, sink: Mapping[str, Any], **source: Any) -> dict[str, Any]:
    # Structured delivery and a double echoing with this content type: every answer of the
    # function is a reply event (the request event itself).
    function_double.script("/pushes", headers={"Content-Type": "application/cloudevents+json"})
    return {
        "functions": [{"name": "pushes", "url": function_double.url("/pushes"), "topics": ["com.github.*"]}],
        "sources": [{"type": "cloudevents", "delivery": "structured", "reply_sink": dict(sink), **source}],
    }


def from_broker(headers: Mapping[str, str] | None, body: bytes) -> CloudEvent:
    """A published reply decoded by the SDK (the broker's headers as the binding's)."""
    assert headers is not None and headers.get("Content-Type") == "application/cloudevents+json", headers
    event = from_http_event(HTTPMessage(dict(headers), body))
    assert isinstance(event, CloudEvent)
    return event


async def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    samples = await daemon.metrics()
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return samples.get(key, 0.0)


async def post(
    http: aiohttp.ClientSession, url: str, event: CloudEvent, **headers: str
) -> aiohttp.ClientResponse:
    binary = to_binary_event(event)
    async with http.post(url, data=binary.body, headers={**binary.headers, **headers}) as r:
        await r.read()
        return r


async def test_every_reply_event_is_published_to_nats_asked_for_or_not(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    http: aiohttp.ClientSession,
    nats_server: NatsServer,
) -> None:
    subject = unique("replies.")
    async with connected(nats_server.url) as nc:
        got: list[Msg] = []

        async def on_msg(msg: Msg) -> None:
            got.append(msg)

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        sink = {"type": "nats", "servers": [nats_server.url], "subject": subject}
        daemon = await daemon_factory(config(function_double, sink, reply=True))
        url = f"{daemon.url}/cloudevents"

        # Not asked for: 202 to the sender, the reply published all the same.
        assert (await post(http, url, sdk_event(1))).status == 202
        # Asked for: the sender gets it, and so does the sink.
        asked = await post(http, url, sdk_event(2), Prefer="reply")
        assert asked.status == 200 and asked.headers["ce-id"] == "evt-2"
        # A batch: one reply per event.
        batch = [json.loads(to_structured_event(sdk_event(n)).body) for n in (3, 4, 5)]
        async with http.post(url, data=json.dumps(batch), headers={"Content-Type": BATCH}) as r:
            assert r.status == 202
        await wait_for(lambda: len(got) == 5, 10, what="5 reply events on NATS")

        events = {e.get_id(): e for e in (from_broker(m.headers, m.data) for m in got)}
        assert sorted(events) == ["evt-1", "evt-2", "evt-3", "evt-4", "evt-5"]
        assert events["evt-4"].get_data() == {"n": 4}
        assert events["evt-4"].get_type() == "com.github.push"
        assert events["evt-4"].get_extension("traceid") == "t4"
        # Structured mode: the whole event is the body.
        assert json.loads(got[0].data)["specversion"] == "1.0"
        assert await metric(daemon, "fastconn_replies_published_total", source="cloudevents") == 5

        # A function answer that is no event publishes nothing.
        function_double.script("/pushes", headers={"Content-Type": "text/plain"})
        assert (await post(http, url, sdk_event(6))).status == 202
        await wait_for(lambda: len(function_double.calls_to("/pushes")) == 6, 10, what="the 6th call")
        await daemon.stop()

        # Binary delivery: the double echoes the data alone, a structured "event" without id.
        daemon = await daemon_factory(config(function_double, sink, delivery="binary"))
        assert (await post(http, f"{daemon.url}/cloudevents", sdk_event(7))).status == 202

        async def malformed_counted() -> bool:
            kind = "reply_malformed"
            return await metric(daemon, "fastconn_source_errors_total", source="cloudevents", kind=kind) == 1

        await wait_for(malformed_counted, 10, what="the malformed reply counted")
        assert "malformed reply event, not published" in daemon.output()
        await nc.flush()
        assert len(got) == 5, "nothing else was published"
        assert await metric(daemon, "fastconn_replies_published_total", source="cloudevents") == 0


async def test_replies_are_stored_in_jetstream_and_a_refused_publish_never_blocks_the_ingress(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    http: aiohttp.ClientSession,
    nats_server: NatsServer,
) -> None:
    subject, stream = unique("replies.js."), unique("REPLIES")
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        sink = {"type": "jetstream", "servers": [nats_server.url], "subject": subject}
        daemon = await daemon_factory(config(function_double, sink))
        url = f"{daemon.url}/cloudevents"
        for n in range(1, 4):
            assert (await post(http, url, sdk_event(n))).status == 202

        async def published() -> bool:
            return await metric(daemon, "fastconn_replies_published_total", source="cloudevents") == 3

        await wait_for(published, 10, what="3 replies acknowledged by JetStream")
        consumer = await js.pull_subscribe(subject, durable=unique("reader"), stream=stream)
        msgs = await consumer.fetch(3, timeout=5)
        assert sorted(from_broker(m.headers, m.data).get_id() for m in msgs) == ["evt-1", "evt-2", "evt-3"]
        await daemon.stop()

        # No stream captures this subject: every publish is refused (no acknowledgement).
        lost = {"type": "jetstream", "servers": [nats_server.url], "subject": unique("nowhere.")}
        daemon = await daemon_factory(config(function_double, lost))
        url = f"{daemon.url}/cloudevents"
        for n in range(10, 14):
            assert (await post(http, url, sdk_event(n))).status == 202

        async def failures_counted() -> bool:
            kind = "reply_failed"
            return await metric(daemon, "fastconn_source_errors_total", source="cloudevents", kind=kind) == 4

        await wait_for(failures_counted, 20, what="4 refused publishes counted")
        assert await metric(daemon, "fastconn_replies_published_total", source="cloudevents") == 0
        assert len(function_double.calls_to("/pushes")) == 7, "every event reached the function"
        assert "reply event not published" in daemon.output()


async def test_replies_are_published_to_kafka_with_acks_all(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    http: aiohttp.ClientSession,
    kafka_broker: Broker,
) -> None:
    topic = await kafka_broker.create_topic(unique("replies-"))
    sink = {"type": "kafka", "bootstrap_servers": kafka_broker.bootstrap, "topic": topic}
    daemon = await daemon_factory(config(function_double, sink))
    for n in (1, 2):
        assert (await post(http, f"{daemon.url}/cloudevents", sdk_event(n))).status == 202
    records = await kafka_broker.read(topic, 2)
    events = [from_broker({k: v.decode() for k, v in r.headers}, r.value) for r in records]
    assert sorted(e.get_id() for e in events) == ["evt-1", "evt-2"]

    async def published() -> bool:
        return await metric(daemon, "fastconn_replies_published_total", source="cloudevents") == 2

    await wait_for(published, 10, what="2 replies acknowledged by Kafka")
