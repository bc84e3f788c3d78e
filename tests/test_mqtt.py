"""The MQTT source against a real mosquitto (started by the test with its own config), with the
daemon run as users run it."""

from __future__ import annotations

import aiohttp
import pytest

from conftest import DaemonFactory
from fastconn.testing import FunctionDouble, free_port, wait_for
from mqtt_fixtures import (  # noqa: F401
    Mosquitto,
    collect,
    daemon_config,
    mosquitto,
    mqtt_source,
    properties,
    publish,
    unique,
)


def _bodies(double: FunctionDouble, path: str, status: int | None = None) -> list[bytes]:
    return [c.body for c in double.calls_to(path) if status is None or c.status == status]


async def test_routing_and_headers(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    # No topics key: the source subscribes what the functions' topics are (wildcards included).
    config = daemon_config(function_double, {"temp": ["sensors/+/temp"]}, [mqtt_source(mosquitto)])
    await daemon_factory(config)
    props = properties(user=[("trace-id", "t-1"), ("X-Topic", "spoofed")], content_type="application/json")
    await publish(mosquitto.port, "sensors/a/temp", [b'{"c": 21}'], props=props)
    await publish(mosquitto.port, "sensors/a/humidity", [b"ignored"])
    await publish(mosquitto.port, "sensors/b/temp", [b"second"], qos=0)
    await wait_for(lambda: len(function_double.calls_to("/temp")) == 2, what="both temp messages")
    first, second = sorted(function_double.calls_to("/temp"), key=lambda c: c.body)
    h = second.headers
    assert second.body == b'{"c": 21}'
    assert h["X-Topic"] == "sensors/a/temp"
    assert (h["X-Mqtt-Qos"], h["X-Mqtt-Retain"]) == ("1", "false")
    assert int(h["X-Mqtt-Message-Id"]) > 0
    assert h["trace-id"] == "t-1"
    assert h["Content-Type"] == "application/json"
    assert first.body == b"second"
    assert (first.headers["X-Topic"], first.headers["X-Mqtt-Qos"]) == ("sensors/b/temp", "0")
    assert all(c.body != b"ignored" for c in function_double.calls)


async def test_acknowledged_only_after_success(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory, fast_dispatch: dict
) -> None:
    """A message whose function keeps failing is not acknowledged: a crash brings it back."""
    source = mqtt_source(mosquitto, topics=["jobs/#"], max_deliver=-1, retry_delay="50ms")
    config = daemon_config(function_double, {"job": ["jobs/#"]}, [source], max_attempts=1)
    function_double.script("/job", [503])
    daemon = await daemon_factory(config)
    await publish(mosquitto.port, "jobs/1", [b"work"])
    await wait_for(lambda: len(function_double.calls_to("/job")) >= 3, what="retried calls")
    daemon.kill()
    function_double.script("/job", [200])
    function_double.calls.clear()
    await daemon_factory(config)
    await wait_for(lambda: _bodies(function_double, "/job", 200) == [b"work"], what="redelivery after crash")


async def test_dead_letter_with_context(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    dead = await collect(mosquitto.port, "dead/orders")
    try:
        source = mqtt_source(mosquitto, topics=["orders/#"], dead_letter_topic="dead/orders")
        function_double.script("/order", [422])
        await daemon_factory(daemon_config(function_double, {"order": ["orders/#"]}, [source]))
        props = properties(user=[("tenant", "acme")], content_type="text/plain")
        await publish(mosquitto.port, "orders/eu", [b"bad order"], props=props)
        await wait_for(lambda: dead.messages, what="the dead letter")
        letter = dead.messages[0]
        context = dict(letter.properties.UserProperty)
        assert letter.payload == b"bad order"
        assert letter.properties.ContentType == "text/plain"
        assert context["tenant"] == "acme"
        assert context["fastconn-dlt-original-topic"] == "orders/eu"
        assert context["fastconn-dlt-function"] == "order"
        assert context["fastconn-dlt-status"] == "422"
        assert context["fastconn-dlt-reason"] == "non-retryable failure"
    finally:
        dead.close()


async def test_response_topic_gets_the_functions_response(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    replies = await collect(mosquitto.port, "replies/#")
    try:
        source = mqtt_source(mosquitto, topics=["rpc/+"])
        await daemon_factory(daemon_config(function_double, {"echo": ["rpc/+"]}, [source]))
        props = properties(response_topic="replies/c1", correlation=b"corr-42")
        await publish(mosquitto.port, "rpc/ping", [b"ping"], props=props)
        await wait_for(lambda: replies.messages, what="the response")
        reply = replies.messages[0]
        assert reply.payload == b"ping"  # the double echoes the request body
        assert reply.properties.CorrelationData == b"corr-42"
        user = dict(reply.properties.UserProperty)
        assert (user["X-Function-Name"], user["X-Function-Status"]) == ("echo", "200")
    finally:
        replies.close()


async def test_shared_subscription_splits_the_work(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    n = 400
    daemons = []
    for _ in range(2):
        source = mqtt_source(mosquitto, topics=["work/#"], shared_group="workers")
        daemons.append(await daemon_factory(daemon_config(function_double, {"w": ["work/#"]}, [source])))
    await publish(mosquitto.port, "work/items", [b"%d" % i for i in range(n)])
    await wait_for(lambda: len({c.body for c in function_double.calls}) == n, 20, what="every message")
    shares = []
    for daemon in daemons:
        samples = await daemon.metrics()
        shares.append(sum(v for k, v in samples.items() if k.startswith("fastconn_messages_received_total{")))
    assert all(share > 0 for share in shares), shares  # both took part
    assert sum(shares) >= n


async def test_stalled_function_bounds_intake(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    """With receive_maximum 8 the broker sends 8 messages and waits for acknowledgements: the
    9th call arrives only after the first ones answered, though the dispatcher had room."""
    delay = 1.5
    function_double.script("/slow", [200], delay=delay)
    source = mqtt_source(mosquitto, topics=["slow/#"], receive_maximum=8)
    config = daemon_config(function_double, {"slow": ["slow/#"]}, [source], max_inflight=64)
    await daemon_factory(config)
    await publish(mosquitto.port, "slow/x", [b"%d" % i for i in range(40)])
    await wait_for(lambda: len(function_double.calls_to("/slow")) >= 9, 20, what="a second wave")
    arrivals = sorted(c.at for c in function_double.calls_to("/slow"))
    assert arrivals[7] - arrivals[0] < delay  # the first wave came at once
    assert arrivals[8] >= arrivals[0] + delay * 0.9  # the 9th waited for an acknowledgement


async def _stream(
    mosquitto: Mosquitto,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    n: int,
    fault: str,
) -> None:
    topic = unique("stream/")
    source = mqtt_source(mosquitto, topics=[topic])
    config = daemon_config(function_double, {"sink": [topic]}, [source])
    config["server"] = {"readiness_grace": "0.5s"}
    daemon = await daemon_factory(config)
    await publish(mosquitto.port, topic, [b"%d" % i for i in range(n)])
    await wait_for(lambda: len(function_double.calls_to("/sink")) >= n // 4, 20, what="a quarter handled")
    if fault == "daemon":
        daemon.kill()
        await daemon_factory(config)
    else:
        async with aiohttp.ClientSession() as http:

            async def readyz(status: int) -> bool:
                async with http.get(daemon.url + "/readyz") as r:
                    return r.status == status

            mosquitto.stop()
            await wait_for(lambda: readyz(503), 10, what="/readyz 503 while the broker is away")
            mosquitto.start_again()
            await wait_for(lambda: readyz(200), 20, what="/readyz 200 once reconnected")
    expected = {b"%d" % i for i in range(n)}
    await wait_for(lambda: set(_bodies(function_double, "/sink")) >= expected, 25, what="every message")
    calls = len(function_double.calls_to("/sink"))
    print(f"\n{fault} fault mid-stream of {n}: lost 0, duplicates {calls - n}")


@pytest.mark.slow
async def test_daemon_kill_9_mid_stream_loses_nothing(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    await _stream(mosquitto, function_double, daemon_factory, 10000, "daemon")


@pytest.mark.slow
async def test_broker_restart_mid_stream_loses_nothing(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    await _stream(mosquitto, function_double, daemon_factory, 5000, "broker")


async def test_mqtt_3_1_1_session(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    """MQTT 3.1.1: no properties, a persistent session by clean_session = false."""
    source = mqtt_source(mosquitto, topics=["legacy/#"], protocol="3.1.1")
    config = daemon_config(function_double, {"old": ["legacy/#"]}, [source])
    daemon = await daemon_factory(config)
    await publish(mosquitto.port, "legacy/a", [b"one"])
    await wait_for(lambda: _bodies(function_double, "/old") == [b"one"], what="the first message")
    await daemon.stop()
    await publish(mosquitto.port, "legacy/a", [b"two"])  # queued for the absent session
    await daemon_factory(config)
    await wait_for(lambda: _bodies(function_double, "/old") == [b"one", b"two"], what="the queued message")
    assert function_double.calls_to("/old")[1].headers["X-Mqtt-Qos"] == "1"


async def test_qos2_crash_does_not_shrink_the_receive_window(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    """After a crash at QoS 2 the broker re-sends PUBREL for what the old process had received;
    unanswered, it would hold the session's only slot (receive_maximum 1) and nothing more
    would ever arrive."""
    source = mqtt_source(mosquitto, topics=["q2/#"], qos=2, receive_maximum=1, max_deliver=-1)
    config = daemon_config(function_double, {"q": ["q2/#"]}, [source], max_attempts=1)
    function_double.script("/q", [503])
    daemon = await daemon_factory(config)
    await publish(mosquitto.port, "q2/a", [b"first"], qos=2)
    await wait_for(lambda: len(function_double.calls_to("/q")) >= 2, what="the first message retried")
    daemon.kill()
    function_double.script("/q", [200])
    await daemon_factory(config)
    await publish(mosquitto.port, "q2/a", [b"second"], qos=2)
    await wait_for(lambda: b"second" in _bodies(function_double, "/q", 200), what="the second message")


async def test_unreachable_broker_fails_start_with_a_clear_error(
    function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    source = {"type": "mqtt", "broker": f"tcp://127.0.0.1:{free_port()}", "connect_wait": "1s"}
    daemon = await daemon_factory(daemon_config(function_double, {"f": ["a/#"]}, [source]), wait=None)
    assert daemon.process is not None
    await wait_for(lambda: daemon.process is not None and daemon.process.poll() is not None, 20, what="exit")
    assert daemon.process.returncode != 0
    assert "cannot connect to MQTT at tcp://127.0.0.1" in daemon.output()
    assert "connect_wait (1s)" in daemon.output()


async def test_retry_in_flight_at_stop_is_not_acknowledged(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    """A graceful stop while a failing call is still running leaves its message to the broker."""
    source = mqtt_source(mosquitto, topics=["stop/#"], max_deliver=-1, retry_delay="50ms")
    config = daemon_config(function_double, {"s": ["stop/#"]}, [source], max_attempts=1)
    function_double.script("/s", [503], delay=1.0)
    daemon = await daemon_factory(config)
    await publish(mosquitto.port, "stop/1", [b"keep me"])
    await wait_for(lambda: len(function_double.calls_to("/s")) >= 2, what="a retry in flight")
    assert await daemon.stop() == 0  # the running call answers 503 during the stop
    function_double.script("/s", [200])
    await daemon_factory(config)
    await wait_for(lambda: b"keep me" in _bodies(function_double, "/s", 200), 15, what="redelivery")


async def test_resumed_session_subscribes_a_filter_added_since(
    mosquitto: Mosquitto, function_double: FunctionDouble, daemon_factory: DaemonFactory
) -> None:
    source = mqtt_source(mosquitto, topics=["old/#"])
    daemon = await daemon_factory(daemon_config(function_double, {"f": ["old/#", "new/#"]}, [source]))
    assert await daemon.stop() == 0
    wider = {**source, "topics": ["old/#", "new/#"]}  # same client id: the session is resumed
    await daemon_factory(daemon_config(function_double, {"f": ["old/#", "new/#"]}, [wider]))
    await publish(mosquitto.port, "new/x", [b"fresh"])
    await wait_for(lambda: _bodies(function_double, "/f") == [b"fresh"], what="the new filter's message")
