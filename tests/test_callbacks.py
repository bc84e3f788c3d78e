"""Async invocations with callbacks (issue 5): the dispatcher's async layer against the gateway
double's documented async behaviour (202 + X-Call-Id, then a POST to X-Callback-Url)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from nats.aio.msg import Msg

from callback_harness import Harness, harness_factory  # noqa: F401 (fixture)
from fastconn import Message, Verdict
from fastconn.testing import DaemonProcess, wait_for
from gateway_double import FunctionSpec, GatewayDouble
from nats_fixtures import NatsServer, connected, nats_server, unique  # noqa: F401 (fixture)
from test_jetstream import acked_up_to, add_stream, consumer, js_source


async def test_success_settles_only_after_the_callback(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("slow", statuses=[200], body=b"done", callback_delay=0.5)
    h.dispatcher.set_functions([h.target("slow", "jobs")])
    started = time.monotonic()
    await h.dispatcher.submit([Message("jobs", b"work")], h.collect)
    await wait_for(lambda: h.gateway.calls("slow") == 1, what="the async call")
    await asyncio.sleep(0.2)
    assert h.outcomes == [], "the 202 must not settle the message"
    assert h.callbacks.pending == 1
    await wait_for(lambda: h.outcomes, what="the outcome")
    assert time.monotonic() - started >= 0.5
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    [result] = outcome.results
    assert (result.function, result.status, result.body) == ("slow", 200, b"done")
    assert h.callbacks.pending == 0
    assert h.observed == [outcome], "the response hook sees the final result, not the 202"
    [request] = h.gateway.requests_for("slow")
    assert request.path == "/async-function/slow"
    assert request.headers["X-Callback-Url"].startswith(f"{h.public_url}/callback/")
    assert request.headers["X-Call-Id"]


async def test_a_failing_callback_is_reinvoked_then_succeeds(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("flaky", statuses=[500, 200])
    h.dispatcher.set_functions([h.target("flaky", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x", message_id="m-1")], h.collect)
    await wait_for(lambda: h.outcomes, what="the outcome")
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    assert outcome.results[0].attempts == 2
    requests = h.gateway.requests_for("flaky")
    assert len(requests) == 2
    call_ids = {r.headers["X-Call-Id"] for r in requests}
    assert len(call_ids) == 2, "each invocation has its own call id"
    assert {r.headers["X-Message-Id"] for r in requests} == {"m-1"}, "the message id stays the same"


async def test_retryable_failures_exhaust_to_retry_and_final_ones_fail(
    harness_factory: Callable[..., object],
) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("down", statuses=[503])
    h.gateway.script("bad", statuses=[400])
    h.dispatcher.set_functions([h.target("down", "a"), h.target("bad", "b")])
    await h.dispatcher.submit([Message("a", b"1"), Message("b", b"2")], h.collect)
    await wait_for(lambda: len(h.outcomes) == 2, what="both outcomes")
    by_topic = {o.message.topic: o for o in h.outcomes}
    assert by_topic["a"].verdict is Verdict.RETRY
    assert h.gateway.calls("down") == 3, "max_attempts invocations"
    assert by_topic["b"].verdict is Verdict.FAILED
    assert h.gateway.calls("bad") == 1, "a 400 is not retried"
    assert by_topic["b"].results[0].status == 400


async def test_a_lost_callback_times_out_and_is_retried(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory(timeout=0.3)  # type: ignore[misc]
    h.gateway.script("lossy", statuses=[200], callback_copies=[0, 1])
    h.dispatcher.set_functions([h.target("lossy", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.outcomes, timeout=5, what="the outcome")
    assert h.outcomes[0].verdict is Verdict.OK
    assert h.gateway.calls("lossy") == 2, "re-invoked after the callback timeout"


async def test_forged_and_duplicate_callbacks_are_refused(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("dup", statuses=[200], callback_copies=2, callback_delay=0.3)
    h.dispatcher.set_functions([h.target("dup", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.gateway.calls("dup") == 1, what="the call")
    call_id = h.gateway.requests_for("dup")[0].headers["X-Call-Id"]
    async with aiohttp.ClientSession() as http:
        forged = {"X-Call-Id": call_id, "X-Function-Status": "200", "X-Function-Name": "dup"}
        async with http.post(f"{h.public_url}/callback/{'0' * 40}", headers=forged, data=b"evil") as r:
            assert r.status == 401
        async with http.post(f"{h.public_url}/callback/nothing", data=b"") as r:
            assert r.status == 401, "no call id"
    assert h.outcomes == [] and h.callbacks.pending == 1, "a forged callback changes nothing"
    sent = await asyncio.wait_for(h.gateway.wait_callbacks(2), 5)
    assert sorted(c.response_status for c in sent) == [200, 409], "the duplicate is refused"
    assert len(h.outcomes) == 1 and h.outcomes[0].results[0].body == b"x"
    rejected = {
        s.labels["reason"]: s.value
        for m in h.callbacks.metrics.rejected.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert rejected == {"bad_token": 2.0, "duplicate": 1.0}


async def test_pending_bound_gives_backpressure(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory(max_pending=2)  # type: ignore[misc]
    h.gateway.script("held", statuses=[200], callback_delay=0.4)
    h.dispatcher.set_functions([h.target("held", "jobs")])
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while len(h.outcomes) < 6:
            peak = max(peak, h.callbacks.pending)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    for i in range(3):  # three batches of two: the third waits for the first to settle
        await h.dispatcher.submit([Message("jobs", b"%d" % i), Message("jobs", b"%d" % i)], h.collect)
    await asyncio.wait_for(watcher, 10)
    assert peak == 2
    assert h.gateway.calls("held") == 6


async def test_on_accept_settles_on_the_202_and_only_a_202(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory(ack="on_accept")  # type: ignore[misc]
    h.gateway.script("later", statuses=[500], callback_delay=0.2)
    h.dispatcher.set_functions([h.target("later", "jobs"), h.target("sync200", "jobs", asynchronous=False)])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.outcomes, what="the outcome")
    results = {r.function: r.status for r in h.outcomes[0].results}
    assert results["later"] == 202
    assert "X-Callback-Url" not in h.gateway.requests_for("later")[0].headers
    assert h.callbacks.pending == 0


async def test_sync_and_async_functions_fan_out_and_fan_in(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("slowasync", statuses=[200], body=b"async-done", callback_delay=0.3)
    h.gateway.script("quick", statuses=[200], body=b"sync-done")
    h.dispatcher.set_functions(
        [h.target("slowasync", "orders.*"), h.target("quick", "orders.created", asynchronous=False)]
    )
    await h.dispatcher.submit([Message("orders.created", b"o")], h.collect, capture=True)
    await wait_for(lambda: h.outcomes, what="the outcome")
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    assert {r.function: r.body for r in outcome.results} == {
        "slowasync": b"async-done",
        "quick": b"sync-done",
    }
    assert h.gateway.requests_for("quick")[0].path == "/function/quick"


# -- end to end: JetStream → async function → callback → ack ---------------------------------


def async_daemon_config(gateway: GatewayDouble, source: dict[str, object]) -> dict[str, object]:
    return {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "dispatch": {
            "asynchronous_invocation": True,
            "backoff_initial": "10ms",
            "backoff_max": "50ms",
            "shutdown_timeout": "2s",
        },
        "sources": [source],
    }


async def test_jetstream_acks_only_after_the_callback(
    nats_server: NatsServer, gateway: GatewayDouble, tmp_path: Path
) -> None:
    stream, subject = unique("ASYNC"), unique("async")
    gateway.set_functions([FunctionSpec("worker", topic=subject)])
    gateway.script("worker", statuses=[200], callback_delay=1.0)
    config = async_daemon_config(gateway, js_source(nats_server, stream, [subject], ack_wait="10s"))
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [subject])
        async with DaemonProcess(config, tmp_path) as daemon:
            for i in range(5):
                await nc.jetstream().publish(subject, b"job %d" % i)
            await wait_for(lambda: gateway.calls("worker") == 5, what="5 async calls")
            info = await consumer(nc, stream)
            assert info.num_ack_pending == 5, "accepted (202) but not acknowledged before the callback"
            await acked_up_to(nc, stream, 5)
            metrics = await daemon.metrics()
            assert metrics['fastconn_callbacks_total{function="worker.openfaas-fn",status="200"}'] == 5
            assert metrics["fastconn_pending_callbacks"] == 0
    assert all(r.path.startswith("/async-function/") for r in gateway.requests_for("worker"))


async def test_kill_9_with_calls_pending_loses_no_message(
    nats_server: NatsServer, gateway: GatewayDouble, tmp_path: Path
) -> None:
    stream, subject = unique("ASYNCKILL"), unique("asynckill")
    gateway.set_functions([FunctionSpec("worker", topic=subject)])
    gateway.script("worker", statuses=[200], callback_copies=[0, 0, 0, 1, 1, 1])  # first 3 never call back
    config = async_daemon_config(gateway, js_source(nats_server, stream, [subject], ack_wait="2s"))
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [subject])
        first = DaemonProcess(config, tmp_path)
        await first.start()
        for i in range(3):
            await nc.jetstream().publish(subject, b"job %d" % i)
        await wait_for(lambda: gateway.calls("worker") == 3, what="3 async calls")
        first.kill()
        before_restart = gateway.calls("worker")
        async with DaemonProcess(config, tmp_path):
            await acked_up_to(nc, stream, 3)
    requests = gateway.requests_for("worker")
    assert sorted(r.body for r in requests[:before_restart]) == [b"job 0", b"job 1", b"job 2"]
    again = [(r.body, r.headers["X-Delivery-Attempt"]) for r in requests[before_restart:]]
    assert {body for body, _ in again} == {b"job 0", b"job 1", b"job 2"}, (
        "each message invoked again after the restart"
    )
    # The server may hand the restarted consumer a message the dead one held more than once
    # (each with its own delivery count): at-least-once allows that. What the daemon must not
    # do is invoke one delivery twice.
    assert len(again) == len(set(again)), f"a delivery invoked twice: {again}"


async def test_webhook_source_async_with_wait_returns_the_callback_result(
    gateway: GatewayDouble, tmp_path: Path
) -> None:
    gateway.set_functions([FunctionSpec("render", topic="pages")])
    gateway.script("render", statuses=[201], body=b"rendered", callback_delay=0.3)
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "sources": [{"type": "webhook", "asynchronous_invocation": True}],
    }
    async with DaemonProcess(config, tmp_path) as daemon, aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/webhook/pages?wait=true", data=b"page") as r:
            assert (r.status, await r.read()) == (201, b"rendered")
        async with http.post(f"{daemon.url}/webhook/pages", data=b"page2") as r:
            assert r.status == 202
        await wait_for(lambda: len(gateway.callbacks) == 2, what="both callbacks")
        assert all(c.response_status == 200 for c in gateway.callbacks)
    assert [r.path for r in gateway.requests_for("render")] == ["/async-function/render.openfaas-fn"] * 2


async def test_results_reach_a_response_subject(
    nats_server: NatsServer, gateway: GatewayDouble, tmp_path: Path
) -> None:
    stream, subject, responses = unique("RESP"), unique("resp"), unique("responses")
    gateway.set_functions([FunctionSpec("answer", topic=subject)])
    gateway.script("answer", statuses=[200], body=b"forty-two", headers={"Content-Type": "text/x-answer"})
    source = js_source(nats_server, stream, [subject], response_subject=responses)
    config = async_daemon_config(gateway, source)
    async with connected(nats_server.url) as nc:
        received: list[Msg] = []

        async def collect(msg: Msg) -> None:
            received.append(msg)

        await nc.subscribe(responses, cb=collect)
        await add_stream(nc, stream, [subject])
        async with DaemonProcess(config, tmp_path):
            ack = await nc.jetstream().publish(subject, b"question")
            await wait_for(lambda: received, what="the response message")
            await acked_up_to(nc, stream, 1)
    [msg] = received
    assert msg.data == b"forty-two"
    headers = msg.headers or {}
    call_id = gateway.requests_for("answer")[0].headers["X-Call-Id"]
    assert headers["X-Call-Id"] == call_id, "the async call's id"
    assert headers["X-Function-Status"] == "200"
    assert headers["X-Function-Name"] == "answer.openfaas-fn"
    assert headers["X-Message-Id"] == f"{stream}/{ack.seq}"
    assert headers["Content-Type"] == "text/x-answer"


async def test_a_callback_body_over_one_mebibyte_is_accepted(harness_factory: Callable[..., object]) -> None:
    """aiohttp's default client_max_size (1 MiB) used to refuse it: the call then waited for its
    timeout and was re-invoked, so a large async result could never settle."""
    h: Harness = await harness_factory(timeout=30.0)  # type: ignore[misc]
    big = bytes(range(256)) * (2 * 1024 * 1024 // 256)  # 2 MiB
    h.gateway.script("big", statuses=[200], body=big)
    h.dispatcher.set_functions([h.target("big", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.outcomes, timeout=10, what="the outcome")
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    assert outcome.results[0].body == big
    assert [c.response_status for c in h.gateway.callbacks] == [200]


async def test_a_callback_body_over_the_limit_fails_its_call_at_once(
    harness_factory: Callable[..., object],
) -> None:
    limit = 1024 * 1024
    h: Harness = await harness_factory(timeout=30.0, max_body_bytes=limit)  # type: ignore[misc]
    h.gateway.script("huge", statuses=[200], body=b"z" * (limit + 1), callback_copies=2)
    h.dispatcher.set_functions([h.target("huge", "jobs")])
    started = time.monotonic()
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.outcomes, timeout=10, what="the outcome")
    assert time.monotonic() - started < 5, "settled at once, not after the 30 s callback timeout"
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.FAILED
    [result] = outcome.results
    assert result.status == 413
    assert result.body is not None and b"max_callback_bytes (1048576 bytes)" in result.body
    sent = await asyncio.wait_for(h.gateway.wait_callbacks(2), 5)
    assert [c.response_status for c in sent] == [413, 409], "settled once; the copy is a duplicate"
    assert h.gateway.calls("huge") == 1, "not re-invoked: the same result would be too large again"
    assert h.callbacks.pending == 0
