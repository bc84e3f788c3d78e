"""JetStream source (``type = "jetstream"``) against a real nats-server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from fastconn.config import validate_config
from fastconn.testing import DaemonProcess, FunctionDouble, RecordedCall, wait_for
from nats_fixtures import (
    NatsServer,
    connected,
    daemon_config,
    nats_server,
    start_nats_server,
    unique,
)

__all__ = ["nats_server"]  # fixtures, used by name


def js_source(server: NatsServer, stream: str, subjects: list[str], **options: Any) -> dict[str, Any]:
    return {
        "type": "jetstream",
        "servers": [server.url],
        "stream": stream,
        "subjects": subjects,
        "ack_wait": "2s",
        "nak_delay": "100ms",
        "nak_delay_max": "1s",
        **options,
    }


async def add_stream(nc: Client, name: str, subjects: list[str]) -> None:
    await nc.jetstream().add_stream(name=name, subjects=subjects)


async def consumer(nc: Client, stream: str, durable: str = "fastconn") -> Any:
    return await nc.jetstream().consumer_info(stream, durable)


async def acked_up_to(nc: Client, stream: str, seq: int, durable: str = "fastconn") -> None:
    async def done() -> bool:
        info = await consumer(nc, stream, durable)
        return bool(info.ack_floor.stream_seq == seq and info.num_ack_pending == 0)

    await wait_for(done, 10, 0.05, f"ack floor {seq} on {stream}")


def metric(metrics: dict[str, float], name: str, source: str = "jetstream", **labels: str) -> float:
    wanted = {"source": source, **labels}
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(wanted.items())) + "}"
    return metrics.get(key, 0.0)


def seqs(calls: list[RecordedCall]) -> list[int]:
    return [int(c.headers["X-Nats-Sequence"]) for c in calls]


async def test_ack_on_success_with_headers(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("OK"), unique("ok")
    source = js_source(nats_server, stream, [f"{base}.>"], create_stream=True)
    config = daemon_config(function_double, {"fn": [f"{base}.*"]}, [source])
    async with DaemonProcess(config, tmp_path) as daemon, connected(nats_server.url) as nc:
        js = nc.jetstream()
        for i in range(50):
            ack = await js.publish(f"{base}.{i % 3}", f"m{i}".encode(), headers={"X-Trace": str(i)})
            assert ack.seq == i + 1
        await acked_up_to(nc, stream, 50)
        assert len(function_double.calls) == 50
        for call in function_double.calls:
            seq = int(call.headers["X-Nats-Sequence"])
            assert call.body == f"m{seq - 1}".encode()
            assert call.headers["X-Trace"] == str(seq - 1)
            assert call.headers["X-Topic"] == f"{base}.{(seq - 1) % 3}"
            assert call.headers["X-Nats-Stream"] == stream
            assert call.headers["X-Message-Id"] == f"{stream}/{seq}"
            assert call.headers["X-Delivery-Attempt"] == "1"
        info = await consumer(nc, stream)
        assert info.num_pending == 0 and info.num_redelivered == 0
        assert info.config.ack_wait == 2.0
        metrics = await daemon.metrics()
        assert metric(metrics, "fastconn_messages_acked_total") == 50


async def test_nak_with_growing_delay_then_success(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("NAK"), unique("nak")
    function_double.script("/flaky", [503, 503, 200])
    function_double.script("/limited", [429, 200], headers={"Retry-After": "1"})
    source = js_source(nats_server, stream, [f"{base}.>"], nak_delay="200ms", nak_delay_max="5s")
    config = daemon_config(
        function_double,
        {"flaky": [f"{base}.flaky"], "limited": [f"{base}.limited"]},
        [source],
        max_attempts=1,
        backoff_max="2s",
    )  # Retry-After is capped by it
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [f"{base}.>"])
        async with DaemonProcess(config, tmp_path) as daemon:
            await nc.jetstream().publish(f"{base}.flaky", b"payload")
            await nc.jetstream().publish(f"{base}.limited", b"later")
            await acked_up_to(nc, stream, 2)
            flaky = function_double.calls_to("/flaky")
            assert [c.headers["X-Delivery-Attempt"] for c in flaky] == ["1", "2", "3"]
            assert {c.headers["X-Message-Id"] for c in flaky} == {f"{stream}/1"}
            assert {c.body for c in flaky} == {b"payload"}
            first_gap, second_gap = flaky[1].at - flaky[0].at, flaky[2].at - flaky[1].at
            assert 0.18 <= first_gap < 1.5, first_gap  # < ack_wait (2s): the nak redelivered it
            assert 0.38 <= second_gap < 1.5, second_gap  # the delay doubles
            limited = function_double.calls_to("/limited")
            assert len(limited) == 2
            assert limited[1].at - limited[0].at >= 0.95  # Retry-After: 1 honoured
            metrics = await daemon.metrics()
            assert metric(metrics, "fastconn_source_errors_total", kind="nak") == 3
            assert metric(metrics, "fastconn_messages_acked_total") == 2


async def test_dead_letter_with_context_on_a_400(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, dlq_stream, base = unique("IN"), unique("DLQ"), unique("dl")
    function_double.script("/bad", [400])  # the double answers with the request body
    source = js_source(nats_server, stream, [f"{base}.in.>"], dead_letter_subject=f"{base}.dlq")
    config = daemon_config(function_double, {"bad": [f"{base}.in.*"], "good": [f"{base}.in.*"]}, [source])
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await add_stream(nc, stream, [f"{base}.in.>"])
        await add_stream(nc, dlq_stream, [f"{base}.dlq"])
        async with DaemonProcess(config, tmp_path) as daemon:
            await js.publish(f"{base}.in.x", b"poison", headers={"X-Trace": "abc", "Nats-Msg-Id": "pub-1"})
            await acked_up_to(nc, stream, 1)
            await wait_for(lambda: _has_messages(nc, dlq_stream, 1), 5, 0.05, "the dead letter")
            dead = await js.get_msg(dlq_stream, 1)
            assert dead.data == b"poison"
            h = dead.headers or {}
            assert h["fastconn-dlt-function"] == "bad"
            assert h["fastconn-dlt-failed-functions"] == "bad"  # "good" succeeded
            assert h["fastconn-dlt-status"] == "400"
            assert h["fastconn-dlt-attempts"] == "1"
            assert h["fastconn-dlt-error"] == "HTTP 400"
            assert h["fastconn-dlt-response"] == "poison"
            assert h["fastconn-dlt-reason"] == "non-retryable failure"
            assert h["fastconn-dlt-original-subject"] == f"{base}.in.x"
            assert h["fastconn-dlt-original-stream"] == stream
            assert h["fastconn-dlt-original-sequence"] == "1"
            assert h["fastconn-dlt-message-id"] == f"{stream}/1"
            assert h["fastconn-dlt-deliveries"] == "1"
            assert h["X-Trace"] == "abc"
            await asyncio.sleep(0.3)
            assert len(function_double.calls_to("/bad")) == 1, "terminated: never redelivered"
            metrics = await daemon.metrics()
            assert metric(metrics, "fastconn_messages_failed_total") == 1


async def _has_messages(nc: Client, stream: str, n: int) -> bool:
    info = await nc.jetstream().stream_info(stream)
    return bool(info.state.messages >= n)


async def test_max_deliver_exhaustion(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """Always 503: ``max_deliver`` deliveries, then the dead-letter subject; without one the
    message is kept: a metric says it is stuck, it keeps coming back (the server never drops it,
    even on a consumer created with a limit) and is acknowledged once the function recovers."""
    s1, s2, dlq, base = unique("MD"), unique("MDK"), unique("MDDLQ"), unique("md")
    function_double.script("/down", [503])
    function_double.script("/down2", [503])
    sources = [
        js_source(
            nats_server,
            s1,
            [f"{base}.a"],
            name="with-dlq",
            max_deliver=3,
            nak_delay="50ms",
            dead_letter_subject=f"{base}.dlq",
        ),
        js_source(nats_server, s2, [f"{base}.b"], name="keep", max_deliver=3, nak_delay="50ms"),
    ]
    config = daemon_config(
        function_double, {"down": [f"{base}.a"], "down2": [f"{base}.b"]}, sources, max_attempts=2
    )
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await add_stream(nc, s1, [f"{base}.a"])
        await add_stream(nc, s2, [f"{base}.b"])
        await add_stream(nc, dlq, [f"{base}.dlq"])
        # An existing durable with a server-side limit: fastconn lifts it (the server would drop
        # the message after its 3rd delivery).
        await js.add_consumer(
            s2, ConsumerConfig(durable_name="fastconn", ack_policy=AckPolicy.EXPLICIT, max_deliver=3)
        )
        async with DaemonProcess(config, tmp_path) as daemon:
            await js.publish(f"{base}.a", b"a")
            await js.publish(f"{base}.b", b"b")
            await acked_up_to(nc, s1, 1)
            await wait_for(lambda: _has_messages(nc, dlq, 1), 5, 0.05, "the dead letter")
            # 3 deliveries x 2 attempts each
            assert len(function_double.calls_to("/down")) == 6
            h = (await js.get_msg(dlq, 1)).headers or {}
            assert h["fastconn-dlt-reason"] == "max_deliver (3) reached"
            assert h["fastconn-dlt-deliveries"] == "3"
            assert h["fastconn-dlt-status"] == "503"
            assert h["fastconn-dlt-attempts"] == "2"

            async def stuck() -> bool:
                metrics = await daemon.metrics()
                return metric(metrics, "fastconn_source_errors_total", source="keep", kind="stuck") >= 1

            await wait_for(stuck, 5, 0.05, "the stuck metric")
            assert "stays in the stream" in daemon.output()
            await wait_for(
                lambda: len(function_double.calls_to("/down2")) >= 8,
                10,
                0.05,
                "a delivery past max_deliver (the message is kept, every nak_delay_max)",
            )
            info = await consumer(nc, s2)
            assert info.config.max_deliver == -1
            assert info.ack_floor.stream_seq == 0, "never acknowledged: nothing silently dropped"
            assert int(function_double.calls_to("/down2")[-1].headers["X-Delivery-Attempt"]) > 3
            assert (
                metric(await daemon.metrics(), "fastconn_source_errors_total", source="keep", kind="dropped")
                == 0
            )
            function_double.script("/down2", [200])
            await acked_up_to(nc, s2, 1)


async def test_in_progress_acks_keep_a_slow_call(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("SLOW"), unique("slow")
    function_double.script("/slow", [200], delay=2.5)
    source = js_source(nats_server, stream, [base], ack_wait="1s")
    config = daemon_config(function_double, {"slow": [base]}, [source], max_attempts=1)
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        async with DaemonProcess(config, tmp_path):
            await nc.jetstream().publish(base, b"takes a while")
            await acked_up_to(nc, stream, 1)
            info = await consumer(nc, stream)
            assert info.num_redelivered == 0
            assert info.delivered.consumer_seq == 1, "delivered once: ack_wait never ran out"
            assert len(function_double.calls_to("/slow")) == 1


async def test_two_daemons_share_one_durable(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("SHARE"), unique("share")
    function_double.script("/fn", [200], delay=0.01)
    source = js_source(nats_server, stream, [base], max_ack_pending=20, fetch_batch=10)
    config = daemon_config(function_double, {"fn": [base]}, [source])
    n = 300
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        async with DaemonProcess(config, tmp_path) as one, DaemonProcess(config, tmp_path) as two:
            js = nc.jetstream()
            for i in range(n):
                await js.publish(base, str(i).encode())
            await acked_up_to(nc, stream, n)
            assert sorted(seqs(function_double.calls)) == list(range(1, n + 1)), "each message once"
            first = metric(await one.metrics(), "fastconn_messages_acked_total")
            second = metric(await two.metrics(), "fastconn_messages_acked_total")
            assert first + second == n
            assert first > 0 and second > 0, (first, second)


async def test_key_ordering_with_a_retry(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("KEY"), unique("key")
    delay = 0.04
    function_double.script("/fn", [503, 200], delay=delay)  # the very first call fails once
    source = js_source(nats_server, stream, [base], ordering="key", ordering_key="X-Key")
    config = daemon_config(function_double, {"fn": [base]}, [source], max_attempts=1)
    keys, per_key = ["a", "b", "c", "d"], 12
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        js = nc.jetstream()
        for i in range(per_key):
            for key in keys:
                await js.publish(base, f"{key}-{i}".encode(), headers={"X-Key": key})
        async with DaemonProcess(config, tmp_path):
            await acked_up_to(nc, stream, len(keys) * per_key)
    calls = function_double.calls
    assert len(calls) == len(keys) * per_key + 1
    retried = calls[0].body
    again = [c for c in calls[1:] if c.body == retried]
    assert len(again) == 1 and again[0].headers["X-Delivery-Attempt"] == "2"
    order: dict[str, list[int]] = defaultdict(list)
    for call in calls[1:]:
        key, index = call.body.decode().split("-")
        order[key].append(int(index))
    assert order == {key: list(range(per_key)) for key in keys}, "per key, publish order"
    # Different keys ran side by side (serial would space every call by `delay`).
    overlapping = sum(
        1
        for x, y in itertools.pairwise(calls)
        if x.headers["X-Key"] != y.headers["X-Key"] and y.at - x.at < delay / 2
    )
    assert overlapping >= len(keys), overlapping


async def test_backpressure_a_stalled_function_stops_fetching(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("BP"), unique("bp")
    function_double.script("/stall", [200], delay=3.5)
    config = daemon_config(
        function_double,
        {"stall": [base]},
        [js_source(nats_server, stream, [base])],
        max_inflight=2,
        batch_size=4,
        max_attempts=1,
    )  # dispatcher queue: 8
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        js = nc.jetstream()
        for _ in range(300):
            await js.publish(base, b"x" * 100)
        daemon = DaemonProcess(config, tmp_path)
        await daemon.start()
        try:
            await wait_for(lambda: len(function_double.calls) >= 2, 5, what="the stalled calls")
            await asyncio.sleep(1.0)
            before = await consumer(nc, stream)
            await asyncio.sleep(1.0)
            after = await consumer(nc, stream)
            assert before.num_ack_pending <= 8, before.num_ack_pending
            assert after.delivered.consumer_seq == before.delivered.consumer_seq, "fetching stopped"
            assert after.num_pending >= 300 - 8, "the backlog stays in the stream"
            metrics = await daemon.metrics()
            assert metric(metrics, "fastconn_messages_received_total", topic=base) <= 8
            assert len(function_double.calls) == 2  # max_inflight
        finally:
            daemon.kill()


async def test_kill_9_mid_stream_then_restart_loses_nothing(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    stream, base = unique("CRASH"), unique("crash")
    function_double.script("/fn", [200], delay=0.005)
    n = 1500
    config = daemon_config(
        function_double, {"fn": [base]}, [js_source(nats_server, stream, [base])], max_inflight=16
    )
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        js = nc.jetstream()
        for i in range(n):
            await js.publish(base, str(i).encode())
        first = DaemonProcess(config, tmp_path)
        await first.start()
        await wait_for(lambda: len(function_double.calls) >= n // 4, 20, what="a quarter of the calls")
        first.kill()
        at_kill = len(function_double.calls)
        started = time.monotonic()
        async with DaemonProcess(config, tmp_path):
            await wait_for(
                lambda: set(seqs(function_double.calls)) >= set(range(1, n + 1)),
                30,
                0.05,
                "every message at least once",
            )
            elapsed = time.monotonic() - started
            await acked_up_to(nc, stream, n)
    counts = Counter(seqs(function_double.calls))
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"\nkill -9 after {at_kill}/{n} calls: all {n} delivered after restart in {elapsed:.1f}s, "
        f"{duplicates} duplicate(s)"
    )
    assert set(counts) == set(range(1, n + 1))
    assert duplicates <= 300  # at most what was in flight or received-but-unacked at the kill


async def test_graceful_stop_then_restart_delivers_each_message_once(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: calls in flight finish and are acked, whatever arrives later is handed
    back at once; the next daemon takes over without a single duplicate call."""
    stream, base = unique("TERM"), unique("term")
    function_double.script("/fn", [200], delay=0.01)
    n = 400
    config = daemon_config(
        function_double,
        {"fn": [base]},
        [js_source(nats_server, stream, [base], ack_wait="30s", max_ack_pending=50)],
        max_inflight=8,
    )
    async with connected(nats_server.url) as nc:
        await add_stream(nc, stream, [base])
        js = nc.jetstream()
        for i in range(n):
            await js.publish(base, str(i).encode())
        first = DaemonProcess(config, tmp_path)
        await first.start()
        await wait_for(lambda: len(function_double.calls) >= n // 4, 10, what="a quarter of the calls")
        assert await first.stop() == 0
        stopped_at = len(function_double.calls)
        assert stopped_at < n
        started = time.monotonic()
        async with DaemonProcess(config, tmp_path):
            await acked_up_to(nc, stream, n)
        elapsed = time.monotonic() - started
    counts = Counter(seqs(function_double.calls))
    assert set(counts) == set(range(1, n + 1))
    assert max(counts.values()) == 1, "no duplicates after a graceful stop"
    assert elapsed < 10, "handed back at once, not after ack_wait (30s)"


async def test_survives_a_server_restart(function_double: FunctionDouble, tmp_path: Path) -> None:
    workdir = tmp_path / "server"
    server = start_nats_server(workdir)
    stream, base = unique("RS"), unique("rs")
    source = js_source(server, stream, [base], create_stream=True, reconnect_wait="100ms")
    config = daemon_config(function_double, {"fn": [base]}, [source])
    try:
        async with DaemonProcess(config, tmp_path) as daemon:
            async with connected(server.url) as nc:
                for i in range(20):
                    await nc.jetstream().publish(base, str(i).encode())
                await acked_up_to(nc, stream, 20)
            server.stop()
            server = start_nats_server(workdir, port=server.port)
            async with connected(server.url) as nc:
                for i in range(20, 40):
                    await nc.jetstream().publish(base, str(i).encode())
                await acked_up_to(nc, stream, 40)
            assert sorted(set(seqs(function_double.calls))) == list(range(1, 41))
            # The outage is reported once, then its end (see tests/test_source_health.py).
            assert f"{server.url} reachable again" in daemon.output()
    finally:
        server.stop()


def test_config_validation() -> None:
    functions = [{"name": "f", "url": "http://127.0.0.1:1/f", "topics": ["t"]}]

    def check(**options: Any) -> Any:
        source = {"type": "jetstream", "stream": "S", **options}
        return validate_config({"functions": functions, "sources": [source]}).sources[0]

    config = check()
    assert (config.durable, config.deliver_policy, config.max_deliver, config.ordering) == (
        "fastconn",
        "all",
        5,
        "none",
    )
    assert check(ack_wait="1m30s").ack_wait == 90
    for bad in (
        {"stream": "a.b"},
        {"max_deliver": 0},
        {"nak_delay": "2s", "nak_delay_max": "1s"},
        {"subjects": ["x.>"], "dead_letter_subject": "x.dlq"},
        {"dead_letter_subject": "x.*"},
        {"deliver_policy": "by_time"},
        {"ordering": "partition"},
        {"streem": "S"},
    ):
        with pytest.raises(Exception, match="sources\\[0\\]"):
            check(**bad)


async def test_a_missing_stream_fails_start(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    config = daemon_config(function_double, {"fn": ["x"]}, [js_source(nats_server, unique("NONE"), ["x"])])
    with pytest.raises(RuntimeError, match="does not exist"):
        await DaemonProcess(config, tmp_path).start()
