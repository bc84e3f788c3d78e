"""``type = "cloudevents"`` served by a running daemon's ingress server, with the ``cloudevents``
SDK as an independent producer: every content mode reaches the function intact, refusals name
what is wrong, and a ``Prefer: reply`` sender gets the function's reply event."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from fastconn.testing import FunctionDouble, wait_for
from gateway_double import FunctionSpec, GatewayDouble, async_daemon_config

if TYPE_CHECKING:
    from conftest import DaemonFactory

BATCH = "application/cloudevents-batch+json"


def sdk_event(data: Any = None, **attributes: Any) -> CloudEvent:
    base: dict[str, Any] = {
        "id": "evt-1",
        "source": "https://github.com/org/repo",
        "type": "com.github.push",
        "subject": "main",
        "time": datetime(2026, 12, 3, 10, 43, 30, tzinfo=UTC),
        "datacontenttype": "application/json",
    }
    base.update(attributes)
    return CloudEvent(attributes=base, data=data)


def _config(function_double: FunctionDouble, **source: Any) -> dict[str, Any]:
    return {
        "functions": [
            {"name": "pushes", "url": function_double.url("/pushes"), "topics": ["com.github.*"]},
        ],
        "sources": [{"type": "cloudevents", **source}],
    }


def _seen(function_double: FunctionDouble) -> list[CloudEvent]:
    """The events the function received, decoded by the SDK."""
    events = []
    for call in function_double.calls_to("/pushes"):
        event = from_http_event(HTTPMessage(dict(call.headers.items()), call.body))
        assert isinstance(event, CloudEvent)
        events.append(event)
    return events


async def test_binary_structured_and_batched_events_reach_the_function(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(_config(function_double, auth_token="s3cret"))
    url = f"{daemon.url}/cloudevents"
    auth = {"Authorization": "Bearer s3cret"}
    binary = to_binary_event(sdk_event({"n": 1}, id="b-1"))
    async with http.post(url, data=binary.body, headers={**binary.headers, **auth}) as r:
        assert r.status == 202, await r.text()
        assert r.headers["X-Message-Id"] == "b-1"
    structured = to_structured_event(sdk_event({"n": 2}, id="s-1", type="com.github.issue"))
    async with http.post(url, data=structured.body, headers={**structured.headers, **auth}) as r:
        assert r.status == 202, await r.text()
        assert r.headers["X-Message-Id"] == "s-1"
    batch = [json.loads(to_structured_event(sdk_event({"n": 3 + i}, id=f"k-{i}")).body) for i in range(3)]
    async with http.post(url, data=json.dumps(batch), headers={"Content-Type": BATCH, **auth}) as r:
        assert r.status == 202, await r.text()
        assert r.headers["X-Message-Id"] == "k-0"
    await wait_for(lambda: len(function_double.calls_to("/pushes")) == 5, timeout=10)
    by_id = {event.get_id(): event for event in _seen(function_double)}
    assert sorted(by_id) == ["b-1", "k-0", "k-1", "k-2", "s-1"]
    assert by_id["b-1"].get_data() == {"n": 1}
    assert by_id["s-1"].get_type() == "com.github.issue" and by_id["s-1"].get_data() == {"n": 2}
    assert [by_id[f"k-{i}"].get_data() for i in range(3)] == [{"n": 3}, {"n": 4}, {"n": 5}]
    for call in function_double.calls_to("/pushes"):
        # The event id is the message id; the sender's credentials stay with fastconn.
        assert call.headers["X-Message-Id"] == call.headers["ce-id"]
        assert "Authorization" not in call.headers
    # The daemon counted them as received from this source.
    async with http.get(f"{daemon.url}/metrics") as r:
        metrics = await r.text()
    assert 'source="cloudevents"' in metrics


async def test_refusals_name_the_problem(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(
        _config(function_double, auth_token="s3cret", max_body_bytes=2000, max_batch=2)
    )
    url = f"{daemon.url}/cloudevents"
    auth = {"Authorization": "Bearer s3cret"}
    good = to_binary_event(sdk_event({"n": 1}))
    async with http.post(url, data=good.body, headers={**good.headers, "Authorization": "Bearer nope"}) as r:
        assert r.status == 401 and "bearer token" in await r.text()
    async with http.post(url, data=good.body, headers=dict(good.headers)) as r:
        assert r.status == 401
    headers = {k: v for k, v in good.headers.items() if k.lower() != "ce-source"}
    async with http.post(url, data=good.body, headers={**headers, **auth}) as r:
        assert r.status == 400 and "source" in await r.text()
    big = to_binary_event(sdk_event({"x": "y" * 3000}))
    async with http.post(url, data=big.body, headers={**big.headers, **auth}) as r:
        assert r.status == 413 and "max_body_bytes (2000)" in await r.text()
    batch = [json.loads(to_structured_event(sdk_event(id=f"k-{i}")).body) for i in range(3)]
    async with http.post(url, data=json.dumps(batch), headers={"Content-Type": BATCH, **auth}) as r:
        assert r.status == 413, await r.text()
    # One event of a batch with a wildcard type refuses the whole batch: nothing half accepted.
    batch = [
        json.loads(to_structured_event(sdk_event(id="ok")).body),
        json.loads(to_structured_event(sdk_event(id="bad", type="com.*.push")).body),
    ]
    async with http.post(url, data=json.dumps(batch), headers={"Content-Type": BATCH, **auth}) as r:
        assert r.status == 400 and "wildcard" in await r.text()
    async with http.get(url, headers=auth) as r:
        assert r.status == 405
    # Refused requests dispatched nothing; a good one still goes through.
    async with http.post(url, data=good.body, headers={**good.headers, **auth}) as r:
        assert r.status == 202
    await wait_for(lambda: len(function_double.calls_to("/pushes")) == 1, timeout=10)
    assert [e.get_id() for e in _seen(function_double)] == ["evt-1"]


async def test_a_signed_route_checks_the_signature(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(
        _config(function_double, hmac_secret="shh", signature_header="X-Hub-Signature-256")
    )
    url = f"{daemon.url}/cloudevents"
    message = to_structured_event(sdk_event({"n": 1}))
    signature = "sha256=" + hmac.new(b"shh", message.body, hashlib.sha256).hexdigest()
    wrong = "sha256=" + hmac.new(b"other", message.body, hashlib.sha256).hexdigest()
    async with http.post(
        url, data=message.body, headers={**message.headers, "X-Hub-Signature-256": wrong}
    ) as r:
        assert r.status == 401 and "X-Hub-Signature-256" in await r.text()
    async with http.post(
        url, data=message.body, headers={**message.headers, "X-Hub-Signature-256": signature}
    ) as r:
        assert r.status == 202, await r.text()
    await wait_for(lambda: len(function_double.calls_to("/pushes")) == 1, timeout=10)
    assert "X-Hub-Signature-256" not in function_double.calls_to("/pushes")[0].headers


async def test_a_prefer_reply_sender_gets_the_functions_reply_event(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    # The function double echoes its request: in structured delivery, with this content type,
    # its answer is a structured event, the reply.
    function_double.script("/pushes", headers={"Content-Type": "application/cloudevents+json"})
    daemon = await daemon_factory(_config(function_double, reply=True, delivery="structured"))
    url = f"{daemon.url}/cloudevents"
    sent = sdk_event({"n": 7}, id="ask-1")
    binary = to_binary_event(sent)
    async with http.post(url, data=binary.body, headers={**binary.headers, "Prefer": "reply"}) as r:
        assert r.status == 200, await r.text()
        # The reply goes back in the sender's (binary) mode.
        assert r.headers["ce-id"] == "ask-1"
        reply = from_http_event(HTTPMessage(dict(r.headers.items()), await r.read()))
    assert isinstance(reply, CloudEvent)
    assert (reply.get_type(), reply.get_data()) == ("com.github.push", {"n": 7})
    structured = to_structured_event(sent)
    async with http.post(url, data=structured.body, headers={**structured.headers, "Prefer": "reply"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/cloudevents+json")
        assert json.loads(await r.read())["id"] == "ask-1"
    # Without Prefer: reply, or for a batch of several events, a 202 and no waiting.
    async with http.post(url, data=binary.body, headers=dict(binary.headers)) as r:
        assert r.status == 202
    batch = json.dumps(
        [json.loads(structured.body), json.loads(to_structured_event(sdk_event(id="ask-3")).body)]
    )
    async with http.post(url, data=batch, headers={"Content-Type": BATCH, "Prefer": "reply"}) as r:
        assert r.status == 202 and r.headers["X-Message-Id"] == "ask-1"
    # A function answering something that is not an event: 202, no reply.
    function_double.script("/pushes", headers={"Content-Type": "text/plain"})
    async with http.post(url, data=binary.body, headers={**binary.headers, "Prefer": "reply"}) as r:
        assert r.status == 202


async def test_a_malformed_reply_event_is_a_502_naming_the_function(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    # Binary delivery: the double echoes the data alone, which as a structured event has no id.
    function_double.script("/pushes", headers={"Content-Type": "application/cloudevents+json"})
    daemon = await daemon_factory(_config(function_double, reply=True))
    binary = to_binary_event(sdk_event({"n": 7}, id="ask-2"))
    async with http.post(
        f"{daemon.url}/cloudevents", data=binary.body, headers={**binary.headers, "Prefer": "reply"}
    ) as r:
        text = await r.text()
        assert r.status == 502 and "pushes" in text and "malformed reply" in text, text
        assert r.headers["X-Message-Id"] == "ask-2"
    assert len(function_double.calls_to("/pushes")) == 1, "the event itself was delivered"


async def test_a_batch_over_the_capacity_left_is_refused_whole_with_503(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    # One call on the wire at a time and room for 2 accepted messages; each call takes 1 s.
    function_double.script("/pushes", delay=1.0)
    config = _config(function_double)
    config["dispatch"] = {"max_inflight": 1, "max_inflight_per_function": 1, "batch_size": 1}
    daemon = await daemon_factory(config)
    url = f"{daemon.url}/cloudevents"
    headers = {"Content-Type": BATCH}

    def batch(*ids: str) -> str:
        return json.dumps([json.loads(to_structured_event(sdk_event(id=i)).body) for i in ids])

    async with http.post(url, data=batch("x-1", "x-2", "x-3"), headers=headers) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "capacity" in await r.text()
    async with http.post(url, data=batch("y-1", "y-2"), headers=headers) as r:
        assert r.status == 202
    single = to_binary_event(sdk_event(id="z-1"))
    async with http.post(url, data=single.body, headers=dict(single.headers)) as r:
        assert r.status == 503, "both rooms are taken by the batch"
    await wait_for(lambda: len(function_double.calls_to("/pushes")) == 2, timeout=10)
    assert sorted(e.get_id() for e in _seen(function_double)) == ["y-1", "y-2"]


async def test_before_the_topic_map_a_request_gets_503_at_once(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession
) -> None:
    gateway.set_functions([FunctionSpec("early", topic="com.github.push")])
    gateway.set_down()  # no topic map until it recovers
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms", "startup_wait": "20s"},
        "sources": [{"type": "cloudevents"}],
    }
    daemon = await daemon_factory(config, wait="health")
    binary = to_binary_event(sdk_event(id="early-1"))
    async with http.post(f"{daemon.url}/cloudevents", data=binary.body, headers=dict(binary.headers)) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "topic map not loaded" in await r.text()
    gateway.set_down(False)

    async def accepted() -> bool:
        async with http.post(
            f"{daemon.url}/cloudevents", data=binary.body, headers=dict(binary.headers)
        ) as r:
            return r.status == 202

    await wait_for(accepted, 10, what="a 202 once the topic map is loaded")
    await wait_for(lambda: gateway.calls("early") == 1, 10, what="the event dispatched")


# -- async invocation: the route is served in Python ------------------------------------------------


async def test_async_invocation_answers_as_the_core_does_and_settles_on_the_callback(
    daemon_factory: DaemonFactory, gateway: GatewayDouble, http: aiohttp.ClientSession
) -> None:
    """The source's asynchronous_invocation hands the route to Python: same answers (202 + id,
    401 for a token or signature, 400 naming the attribute), each event settles when its callback
    arrives, and a failed callback (503) is re-invoked through /async-function/."""
    gateway.set_functions([FunctionSpec("pushes", topic="com.github.*")])
    gateway.script("pushes", statuses=[503, 200], callback_delay=1.0)
    source = {"type": "cloudevents", "auth_token": "s3cret", "hmac_secret": "shh"}
    daemon = await daemon_factory(async_daemon_config(gateway, source))
    url = f"{daemon.url}/cloudevents"
    good = to_binary_event(sdk_event({"n": 1}, id="a-1"))
    signature = "sha256=" + hmac.new(b"shh", good.body, hashlib.sha256).hexdigest()
    auth = {"Authorization": "Bearer s3cret", "X-Signature": signature}
    async with http.post(
        url, data=good.body, headers={**good.headers, **auth, "X-Signature": "sha256=00"}
    ) as r:
        assert r.status == 401 and "X-Signature" in await r.text()
    async with http.post(url, data=good.body, headers={**good.headers, "Authorization": "Bearer no"}) as r:
        assert r.status == 401 and "bearer token" in await r.text()
    headers = {k: v for k, v in good.headers.items() if k.lower() != "ce-source"}
    async with http.post(url, data=good.body, headers={**headers, **auth}) as r:
        assert r.status == 400 and "source" in await r.text()
    async with http.post(url, data=good.body, headers={**good.headers, **auth}) as r:
        assert (r.status, r.headers["X-Message-Id"]) == (202, "a-1"), await r.text()
    await wait_for(lambda: gateway.calls("pushes") == 1, what="the async call")
    acked = 'fastconn_messages_acked_total{source="cloudevents"}'
    assert (await daemon.metrics()).get(acked, 0.0) == 0, "settled before its callback"

    async def settled() -> bool:
        return (await daemon.metrics()).get(acked, 0.0) == 1

    await wait_for(settled, 15, 0.05, "the event settled by the second callback")
    # The double records a callback once its answer is read: after the daemon acted on it.
    await wait_for(lambda: len(gateway.callbacks) == 2, what="both callbacks recorded")
    assert [c.function_status for c in gateway.callbacks] == [503, 200]
    requests = gateway.requests_for("pushes")
    assert [r.path for r in requests] == ["/async-function/pushes.openfaas-fn"] * 2
    assert all(r.headers["ce-id"] == "a-1" for r in requests)
    assert all("Authorization" not in r.headers and "X-Signature" not in r.headers for r in requests)


async def test_functions_invoked_asynchronously_move_the_route_to_python_and_reply_waits_for_the_callback(
    daemon_factory: DaemonFactory, gateway: GatewayDouble, http: aiohttp.ClientSession
) -> None:
    """[dispatch] asynchronous_invocation (every function async) without the source's key: the
    route still needs the async layer, and a Prefer: reply sender gets the callback's reply event."""
    gateway.set_functions([FunctionSpec("pushes", topic="com.github.*")])
    gateway.script("pushes", statuses=200, callback_delay=0.3)
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "dispatch": {"asynchronous_invocation": True},
        "sources": [{"type": "cloudevents", "reply": True, "delivery": "structured"}],
    }
    daemon = await daemon_factory(config)
    binary = to_binary_event(sdk_event({"n": 7}, id="ask-1"))
    async with http.post(
        f"{daemon.url}/cloudevents", data=binary.body, headers={**binary.headers, "Prefer": "reply"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["ce-id"] == "ask-1" and r.headers["X-Message-Id"] == "ask-1"
        reply = from_http_event(HTTPMessage(dict(r.headers.items()), await r.read()))
    assert isinstance(reply, CloudEvent)
    assert (reply.get_type(), reply.get_data()) == ("com.github.push", {"n": 7})
    assert [r.path for r in gateway.requests_for("pushes")] == ["/async-function/pushes.openfaas-fn"]
    await wait_for(lambda: gateway.callbacks, what="the callback recorded")
    assert [c.response_status for c in gateway.callbacks] == [200]
