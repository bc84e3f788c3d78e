"""The Kafka source against a real Kafka-protocol broker (Tansu), in process and as the daemon."""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import uuid
from pathlib import Path
from typing import Any

import pytest

from fastconn.config import validate_config
from fastconn.dispatcher import DispatchOptions
from fastconn.errors import ConfigError, SourceError
from fastconn.functions import FunctionTarget
from fastconn.sources.kafka import (
    KafkaConfig,
    client_options,
    consumer_options,
    function_headers,
    producer_options,
)
from fastconn.testing import DaemonProcess, RecordedCall, wait_for
from kafka_fixtures import Broker, KafkaFunction, kafka_broker, running_source

__all__ = ["kafka_broker"]  # the fixture is used by name


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _headers_of(call: RecordedCall) -> dict[str, str]:
    return {k.lower(): v for k, v in call.headers.items()}


def _headers(fn: KafkaFunction, body: bytes) -> dict[str, str]:
    """The (lower-cased) request headers of the first call with ``body``."""
    return _headers_of(next(c for c in fn.calls if c.body == body))


def _daemon_config(broker: Broker, fn: KafkaFunction, topic: str, group: str, **extra: Any) -> dict[str, Any]:
    return {
        "functions": [{"name": "fn", "url": fn.url("/fn"), "topics": [topic]}],
        "dispatch": {"max_attempts": 2, "backoff_initial": 0.01, "backoff_max": 0.05, "shutdown_timeout": 5},
        "sources": [_source(broker, [topic], group, **extra)],
        "log_level": "info",
    }


def _source(broker: Broker, topics: list[str], group: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "brokers": [broker.bootstrap],
        "topics": topics,
        "group_id": group,
        "session_timeout": 3,
        "heartbeat_interval": 0.5,
        "commit_interval": 0.2,
        "retry_backoff_initial": 0.05,
        "retry_backoff_max": 0.2,
        "revoke_timeout": 3,
        **extra,
    }


async def test_routes_by_topic_with_kafka_headers_and_commits(kafka_broker: Broker) -> None:
    topic_a = await kafka_broker.create_topic(_name("route-a"), 2)
    topic_b = await kafka_broker.create_topic(_name("route-b"), 1)
    topic_none = await kafka_broker.create_topic(_name("route-none"), 1)
    responses = _name("responses")
    group = _name("g")
    async with KafkaFunction() as fn:
        functions = [
            FunctionTarget("fa", (topic_a,), fn.url("/fa")),
            FunctionTarget("fb", (topic_b,), fn.url("/fb")),
        ]
        config = _source(kafka_broker, [topic_a, topic_b, topic_none], group, response_topic=responses)
        async with running_source(config, functions) as h:
            await kafka_broker.produce(
                topic_a,
                [
                    {
                        "value": b"a-text",
                        "key": b"user-1",
                        "headers": [("trace", b"abc"), ("bin", b"\xff\x00")],
                        "partition": 0,
                    },
                    {"value": b"a-binary-key", "key": b"\xff\xfe", "partition": 1},
                    {"value": b"a-no-key", "partition": 1},
                ],
            )
            await kafka_broker.produce(topic_b, [{"value": b"b-1", "key": b"k"}])
            await kafka_broker.produce(topic_none, [{"value": b"nobody"}])
            await wait_for(lambda: len(fn.calls) >= 4, 20, what="4 calls")
            await wait_for(
                lambda: h.sample("fastconn_messages_acked_total", source="kafka") >= 5,
                10,
                what="5 acks (4 delivered + 1 unrouted)",
            )
            await asyncio.sleep(0.3)
            assert sorted(c.body for c in fn.calls_to("/fa")) == [b"a-binary-key", b"a-no-key", b"a-text"]
            assert [c.body for c in fn.calls_to("/fb")] == [b"b-1"]
            assert len(fn.calls) == 4, "the unrouted topic reaches no function"
            text = _headers(fn, b"a-text")
            assert text["x-topic"] == topic_a
            assert text["x-kafka-topic"] == topic_a
            assert text["x-kafka-partition"] == "0"
            assert text["x-kafka-offset"] == "0"
            assert text["x-kafka-key"] == "user-1"
            assert "x-kafka-key-enc" not in text
            assert text["x-kafka-trace"] == "abc"
            assert base64.b64decode(text["x-kafka-bin"]) == b"\xff\x00"
            assert text["x-kafka-bin-enc"] == "b64"
            assert text["x-message-id"] == f"{topic_a}/0/0"
            binary = _headers(fn, b"a-binary-key")
            assert base64.b64decode(binary["x-kafka-key"]) == b"\xff\xfe"
            assert binary["x-kafka-key-enc"] == "b64"
            keyless = _headers(fn, b"a-no-key")
            assert "x-kafka-key" not in keyless
            assert keyless["x-message-id"] == f"{topic_a}/1/1"

            async def all_committed() -> bool:
                a = await kafka_broker.committed(group, topic_a, 2)
                b = await kafka_broker.committed(group, topic_b, 1)
                n = await kafka_broker.committed(group, topic_none, 1)
                return a == {0: 1, 1: 2} and b == {0: 1} and n == {0: 1}

            await wait_for(all_committed, 10, 0.2, "offsets committed past every message (unrouted too)")
            published = await kafka_broker.read(responses, 4)
            by_body = {r.value: dict(r.headers) for r in published}
            assert set(by_body) == {b"echo:a-text", b"echo:a-binary-key", b"echo:a-no-key", b"echo:b-1"}
            headers = by_body[b"echo:a-text"]
            assert headers["X-Function-Name"] == b"fa"
            assert headers["X-Function-Status"] == b"200"
            assert headers["X-Message-Id"] == f"{topic_a}/0/0".encode()
            assert next(r.key for r in published if r.value == b"echo:a-text") == b"user-1", (
                "keyed like the input"
            )


async def test_commits_never_pass_an_unfinished_message(kafka_broker: Broker) -> None:
    """Offset 5 is slow, 6..19 finish first: the committed offset stays at 5 until 5 is done."""
    topic = await kafka_broker.create_topic(_name("gap"), 1)
    group = _name("g")
    release = asyncio.Event()
    async with KafkaFunction(gates={b"m5": release}) as fn:
        config = _source(kafka_broker, [topic], group, ordering="none")
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h:
            await kafka_broker.produce(topic, [{"value": f"m{i}".encode()} for i in range(20)])
            await wait_for(lambda: len(fn.finished) == 19, 20, what="every message but m5 answered")
            assert b"m5" not in {b for b, _, _ in fn.finished}
            assert fn.max_concurrent > 1, "messages ran in parallel (ordering none)"
            # Several commit intervals pass: the watermark must hold at 5.
            for _ in range(4):
                await asyncio.sleep(0.25)
                assert await kafka_broker.committed(group, topic, 1) == {0: 5}
            (part,) = h.source.partitions()
            assert part.mark.committed == 5
            assert part.mark.in_flight == 1
            assert (
                h.sample("fastconn_kafka_committed_offset", source="kafka", topic=topic, partition="0") == 5
            )
            assert (
                h.sample("fastconn_kafka_pending_messages", source="kafka", topic=topic, partition="0") == 15
            )
            release.set()

            async def caught_up() -> bool:
                return await kafka_broker.committed(group, topic, 1) == {0: 20}

            await wait_for(caught_up, 10, 0.1, "the commit to move past 5 once it is done")


async def test_restart_after_kill_9_resumes_from_the_commit_without_loss(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = await kafka_broker.create_topic(_name("crash"), 4)
    group = _name("g")
    total = 400
    everything = {f"m{i}".encode() for i in range(total)}

    async def committed_sum() -> int:
        return sum(v or 0 for v in (await kafka_broker.committed(group, topic, 4)).values())

    async with KafkaFunction(body_delay=0.01) as fn:
        config = _daemon_config(kafka_broker, fn, topic, group)
        first = await DaemonProcess(config, tmp_path).start()
        try:
            await kafka_broker.produce(
                topic,
                [{"value": f"m{i}".encode(), "key": f"k{i % 16}".encode()} for i in range(total)],
                pipelined=True,
            )

            async def some_committed() -> bool:
                return await committed_sum() >= total // 4

            await wait_for(some_committed, 20, 0.05, "a quarter committed")
        finally:
            first.kill()
        await asyncio.sleep(0.2)  # calls the killed daemon left behind finish answering
        at_kill = await committed_sum()
        answered_before = len(fn.finished)
        assert at_kill < total, "killed mid-stream"
        second = await DaemonProcess(config, tmp_path).start()
        try:
            await wait_for(
                lambda: {b for b, s, _ in fn.finished if s == 200} >= everything,
                30,
                0.1,
                "every message delivered after the restart",
            )

            async def all_committed() -> bool:
                return await committed_sum() == total

            await wait_for(all_committed, 15, 0.2, "every offset committed")
        finally:
            assert await second.stop() == 0, second.output()
    after = [b for b, s, _ in fn.finished[answered_before:] if s == 200]
    # The restart reads exactly what was past the committed offsets: nothing before them again,
    # nothing after them skipped.
    assert len(after) == total - at_kill, (len(after), total, at_kill)
    assert set(after) | {b for b, s, _ in fn.finished[:answered_before] if s == 200} == everything
    print(
        f"kill -9 with {at_kill}/{total} committed and {answered_before} answered: "
        f"{answered_before - at_kill} delivered twice"
    )


async def test_per_key_order_under_parallel_load_with_retries(kafka_broker: Broker) -> None:
    topic = await kafka_broker.create_topic(_name("order"), 4)
    group = _name("g")
    keys, per_key = 30, 20
    bodies = [f"k{k}:{n}".encode() for n in range(per_key) for k in range(keys)]
    # Some messages fail past the dispatcher's 2 attempts (a RETRY verdict: the source holds the
    # key and redelivers), some only once (retried inside the dispatcher).
    statuses = {f"k{k}:{n}".encode(): [503, 503, 503, 200] for k, n in ((1, 0), (2, 5), (3, 19), (7, 7))}
    statuses |= {f"k{k}:{n}".encode(): [503, 200] for k, n in ((4, 1), (5, 2), (9, 9))}
    async with KafkaFunction(statuses=statuses, body_delay=0.002) as fn:
        config = _source(kafka_broker, [topic], group)
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h:
            await kafka_broker.produce(
                topic, [{"value": b, "key": b.split(b":")[0]} for b in bodies], pipelined=True
            )
            await wait_for(
                lambda: sum(1 for _, s, _ in fn.finished if s == 200) >= len(bodies),
                30,
                what="every message delivered",
            )

            async def all_committed() -> bool:
                return sum(v or 0 for v in (await kafka_broker.committed(group, topic, 4)).values()) == len(
                    bodies
                )

            await wait_for(all_committed, 10, 0.2, "every offset committed")
            assert h.sample("fastconn_kafka_redeliveries_total", source="kafka") == 4
            assert h.source.stuck_messages == 0
    ok = [b for b, s, _ in fn.finished if s == 200]
    assert sorted(ok) == sorted(bodies), "each message delivered once"
    # Kafka's order is the log's: per key, calls must follow offsets (a retried message repeats
    # its offset; nothing later starts before it is done).
    by_key: dict[bytes, list[tuple[int, bytes]]] = {}
    for call in fn.calls:
        offset = int(_headers_of(call)["x-kafka-offset"])
        by_key.setdefault(call.body.split(b":")[0], []).append((offset, call.body))
    for key, calls in by_key.items():
        offsets = [o for o, _ in calls]
        assert offsets == sorted(offsets), f"{key!r} called out of log order: {calls}"
        assert len(set(offsets)) == per_key
    k1 = [body for _, body in by_key[b"k1"]]
    first = k1.index(b"k1:0")
    assert k1[first : first + 4] == [b"k1:0"] * 4, f"k1 waited for its retried message: {k1}"
    assert fn.max_concurrent > 4, f"keys of one partition ran in parallel (max {fn.max_concurrent} at once)"


async def test_poison_message_is_dead_lettered_with_context_while_its_partition_flows(
    kafka_broker: Broker,
) -> None:
    topic = await kafka_broker.create_topic(_name("poison"), 1)
    dlt = _name("dlt")
    group = _name("g")
    total = 30
    records = [
        {
            "value": f"p{i}".encode(),
            "key": b"bad" if i in (7, 20) else f"k{i % 5}".encode(),
            "headers": [("origin", b"test")],
        }
        for i in range(total)
    ]
    async with KafkaFunction(statuses={b"p7": [400]}) as fn:
        config = _source(kafka_broker, [topic], group, dead_letter_topic=dlt)
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h:
            await kafka_broker.produce(topic, records)
            await wait_for(
                lambda: sum(1 for _, s, _ in fn.finished if s == 200) >= total - 1,
                20,
                what="every other message delivered",
            )

            async def all_committed() -> bool:
                return await kafka_broker.committed(group, topic, 1) == {0: total}

            await wait_for(all_committed, 10, 0.2, "the commit past the dead-lettered message")
            assert h.sample("fastconn_kafka_dead_lettered_total", source="kafka") == 1
            assert h.sample("fastconn_messages_failed_total", source="kafka") == 1
            assert h.sample("fastconn_messages_acked_total", source="kafka") == total - 1
    assert fn.seen[b"p7"] == 1, "a 400 is final: one call, no retries"
    assert sorted(b for b, s, _ in fn.finished if s == 200) == sorted(
        f"p{i}".encode() for i in range(total) if i != 7
    )
    (dead,) = await kafka_broker.read(dlt, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.value == b"p7"
    assert dead.key == b"bad"
    assert headers["origin"] == "test", "the record's own headers are kept"
    assert headers["fastconn-dlt-function"] == "fn"
    assert headers["fastconn-dlt-status"] == "400"
    assert headers["fastconn-dlt-attempts"] == "1"
    assert headers["fastconn-dlt-error"] == "HTTP 400"
    assert headers["fastconn-dlt-response"] == "no: p7"
    assert headers["fastconn-dlt-original-topic"] == topic
    assert headers["fastconn-dlt-original-partition"] == "0"
    assert headers["fastconn-dlt-original-offset"] == "7"
    assert headers["fastconn-dlt-message-id"] == f"{topic}/0/7"


async def test_without_dead_letter_topic_failures_are_kept_and_only_their_key_waits(
    kafka_broker: Broker,
) -> None:
    topic = await kafka_broker.create_topic(_name("stuck"), 1)
    group = _name("g")
    bodies = [b"A0", b"B0", *(f"C{i}".encode() for i in range(10)), b"A1"]
    statuses = {b"A0": [503, 503, 200], b"B0": [400, 400, 200]}
    options = DispatchOptions(max_attempts=1, timeout=10.0)
    async with KafkaFunction(statuses=statuses, retry_after={b"A0": "1"}) as fn:
        config = _source(kafka_broker, [topic], group)
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))], options) as h:
            await kafka_broker.produce(topic, [{"value": b, "key": b[:1]} for b in bodies])
            await wait_for(
                lambda: all(fn.seen.get(f"C{i}".encode()) for i in range(10)), 15, what="the other keys flow"
            )
            assert not fn.seen.get(b"A1"), "A1 waits behind A0"
            assert h.source.stuck_messages >= 1
            assert h.sample("fastconn_kafka_stuck_messages", source="kafka") >= 1
            assert await kafka_broker.committed(group, topic, 1) in ({0: None}, {0: 0}), "A0 holds the commit"
            await wait_for(lambda: fn.seen.get(b"A1"), 10, what="A1 after A0 succeeded")

            async def all_committed() -> bool:
                return await kafka_broker.committed(group, topic, 1) == {0: len(bodies)}

            await wait_for(all_committed, 10, 0.2, "everything committed in the end")
            assert h.source.stuck_messages == 0
            assert h.sample("fastconn_messages_failed_total", source="kafka") == 0, "nothing dropped"
    a0 = [c.at for c in fn.calls if c.body == b"A0"]
    assert len(a0) == 3
    gaps = [b - a for a, b in itertools.pairwise(a0)]
    assert min(gaps) >= 0.95, f"the function's Retry-After (1s) is honoured between redeliveries: {gaps}"
    a1 = next(c.at for c in fn.calls if c.body == b"A1")
    assert a1 > max(t for b, s, t in fn.finished if b == b"A0" and s == 200), "A1 only after A0 succeeded"
    assert fn.seen[b"B0"] == 3, "a final failure without a dead-letter topic is redelivered until it succeeds"
    assert [
        c.headers.get("X-Delivery-Attempt") or c.headers.get("x-delivery-attempt")
        for c in fn.calls
        if c.body == b"A0"
    ] == ["1", "2", "3"]


async def test_stalled_function_pauses_partitions_and_bounds_what_is_held(kafka_broker: Broker) -> None:
    topic = await kafka_broker.create_topic(_name("stall"), 2)
    group = _name("g")
    total = 600
    gate = asyncio.Event()
    options = DispatchOptions(max_inflight=16, max_attempts=1, timeout=30.0)
    async with KafkaFunction(gate_all=gate) as fn:
        config = _source(
            kafka_broker, [topic], group, ordering="none", max_pending_per_partition=50, max_poll_records=20
        )
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))], options) as h:
            await kafka_broker.produce(
                topic, [{"value": f"s{i}".encode(), "partition": i % 2} for i in range(total)], pipelined=True
            )
            consumer = h.source.consumer
            await wait_for(lambda: len(consumer.paused()) == 2, 15, what="both partitions paused")

            def received() -> float:
                return h.sample("fastconn_messages_received_total", source="kafka", topic=topic)

            held = received()
            await asyncio.sleep(1.0)
            assert received() == held, "fetching stopped while the function is stalled"
            assert held <= 2 * (50 + 20), f"at most the budget (+ one fetch) per partition, got {held}"
            for part in h.source.partitions():
                assert 50 <= part.mark.outstanding <= 70
            assert h.dispatcher.queued <= 140
            assert h.sample("fastconn_kafka_paused_partitions", source="kafka") == 2
            assert fn.max_concurrent <= 16
            gate.set()
            await wait_for(lambda: len(fn.finished) >= total, 30, what="everything after the stall")

            async def all_committed() -> bool:
                return sum(v or 0 for v in (await kafka_broker.committed(group, topic, 2)).values()) == total

            await wait_for(all_committed, 10, 0.2, "everything committed")
            assert not consumer.paused(), "partitions resumed"
    assert sorted(b for b, _, _ in fn.finished) == sorted(f"s{i}".encode() for i in range(total))


async def test_group_members_share_partitions_and_lose_nothing_when_joining_and_leaving(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    partitions = 6
    topic = await kafka_broker.create_topic(_name("group"), partitions)
    group = _name("g")
    total = 900
    everything = {f"g{i}".encode() for i in range(total)}

    def config(path: str) -> dict[str, Any]:
        c = _daemon_config(kafka_broker, fn, topic, group)
        c["functions"][0]["url"] = fn.url(path)
        return c

    async def assigned(daemons: list[DaemonProcess]) -> list[int]:
        counts = []
        for d in daemons:
            m = await d.metrics()
            counts.append(int(m.get('fastconn_kafka_assigned_partitions{source="kafka"}', 0)))
        return counts

    async def shared_by(daemons: list[DaemonProcess]) -> bool:
        counts = await assigned(daemons)
        return sum(counts) == partitions and all(counts)

    async def produce() -> None:
        for start in range(0, total, 50):
            await kafka_broker.produce(
                topic,
                [{"value": f"g{i}".encode(), "key": f"k{i % 40}".encode()} for i in range(start, start + 50)],
                pipelined=True,
            )
            await asyncio.sleep(0.25)

    async with KafkaFunction(body_delay=0.003) as fn:
        d1, d2 = await asyncio.gather(
            DaemonProcess(config("/d1"), tmp_path).start(), DaemonProcess(config("/d2"), tmp_path).start()
        )
        d3: DaemonProcess | None = None
        producer = asyncio.create_task(produce())
        try:
            await wait_for(lambda: shared_by([d1, d2]), 20, 0.2, "d1 and d2 sharing the partitions")
            await wait_for(lambda: fn.calls_to("/d1") and fn.calls_to("/d2"), 10, what="both delivering")
            d3 = await DaemonProcess(config("/d3"), tmp_path).start()
            await wait_for(lambda: shared_by([d1, d2, d3]), 20, 0.2, "d3 joined")
            await wait_for(lambda: fn.calls_to("/d3"), 10, what="d3 delivering")
            assert await d1.stop() == 0, d1.output()
            await wait_for(lambda: shared_by([d2, d3]), 20, 0.2, "d1's partitions moved to d2 and d3")
            await producer
            await wait_for(
                lambda: {b for b, s, _ in fn.finished if s == 200} >= everything,
                30,
                0.1,
                "every message delivered",
            )

            async def all_committed() -> bool:
                offsets = await kafka_broker.committed(group, topic, partitions)
                return sum(v or 0 for v in offsets.values()) == total

            await wait_for(all_committed, 15, 0.2, "every offset committed")
            reported = 0.0
            for d in (d2, d3):
                reported += (await d.metrics()).get(
                    'fastconn_kafka_rebalance_duplicates_total{source="kafka"}', 0
                )
        finally:
            producer.cancel()
            for member in (d1, d2, d3):
                if member is not None:
                    await member.stop()
    delivered = [b for b, s, _ in fn.finished if s == 200]
    assert set(delivered) == everything, f"lost: {sorted(everything - set(delivered))[:10]}"
    duplicates = len(delivered) - total
    print(
        f"group: {total} messages, 3 rebalances, {duplicates} delivered twice "
        f"(d2+d3 report {reported:.0f} re-readable at revoke); per member: "
        f"d1={len(fn.calls_to('/d1'))} d2={len(fn.calls_to('/d2'))} d3={len(fn.calls_to('/d3'))}"
    )
    # Every duplicate comes from a rebalance: members commit at most commit_interval behind.
    assert duplicates <= total // 4


async def test_follows_the_topic_map_when_no_topics_are_configured(kafka_broker: Broker) -> None:
    x = await kafka_broker.create_topic(_name("map-x"), 1)
    y = await kafka_broker.create_topic(_name("map-y"), 1)
    group = _name("g")
    async with KafkaFunction() as fn:
        config = _source(kafka_broker, [], group)
        async with running_source(config, [FunctionTarget("fn", (x,), fn.url("/fn"))]) as h:
            await kafka_broker.produce(x, [{"value": b"x0"}])
            await kafka_broker.produce(y, [{"value": b"y0"}])
            await wait_for(lambda: fn.seen.get(b"x0"), 15, what="x0 (x is in the topic map)")
            await asyncio.sleep(0.5)
            assert b"y0" not in fn.seen, "y is not subscribed yet"
            h.set_functions([FunctionTarget("fn", (x, y), fn.url("/fn"))])
            await wait_for(lambda: fn.seen.get(b"y0"), 15, what="y0 once a function subscribes to y")
            assert h.source.consumer.subscription() == {x, y}
            h.set_functions([])
            await wait_for(lambda: not list(h.source.partitions()), 15, what="every partition released")

            async def committed() -> bool:
                return (
                    await kafka_broker.committed(group, x, 1),
                    await kafka_broker.committed(group, y, 1),
                ) == ({0: 1}, {0: 1})

            await wait_for(committed, 10, 0.2, "both topics committed when released")
    assert sorted(fn.seen) == [b"x0", b"y0"]


# -- configuration and option mapping (no broker) ------------------------------------------------

_TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBiDCCAS2gAwIBAgIUBjAVclIEFAM0HV+8wTDdkk2VPUcwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNZmFzdGNvbm4tdGVzdDAgFw0yNjExMjcwNDAwMTZaGA8yMTI2
MTEwMzA0MDAxNlowGDEWMBQGA1UEAwwNZmFzdGNvbm4tdGVzdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABD4G8dJvs6FgZq9/WeqqWncvXetbTB6YedERip3wn7jL
YlCWU3e7ZCM7IEN8FKhpPZrbN1eAAJPPYy4BxLzePBOjUzBRMB0GA1UdDgQWBBRb
suWMLS1yxLSJ939X5pb5XZHdTTAfBgNVHSMEGDAWgBRbsuWMLS1yxLSJ939X5pb5
XZHdTTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDeqjgFq7r+
PmsLCA0ImfW/67l/z/c1u3fHBw7WmplBLwIhAM5jMHBUiJXSpLNe34geBU/kcobN
A539PV1eRA4KC9D6
-----END CERTIFICATE-----
"""
# A throwaway self-signed test key (CN=fastconn-test), not a credential.
_TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6N39ZD06AjQKxmYW
doc+ObTI6LQ2zf4TfZ4RT73VDHuhRANCAAQ+BvHSb7OhYGavf1nqqlp3L13rW0we
mHnREYqd8J+4y2JQllN3u2QjOyBDfBSoaT2a2zdXgACTz2MuAcS83jwT
-----END PRIVATE KEY-----
"""


def _problems(source: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_config(
            {
                "functions": [{"name": "f", "url": "http://127.0.0.1:1/", "topics": ["t"]}],
                "sources": [{"type": "kafka", **source}],
            }
        )
    return {p.location: p.message for p in info.value.problems}


def test_config_defaults() -> None:
    c = KafkaConfig.model_validate({"brokers": ["kafka:9092"]})
    assert (c.group_id, c.initial_offset, c.ordering, c.max_bytes) == ("fastconn", "earliest", "key", 1048576)
    assert (c.topics, c.topic_pattern, c.dead_letter_topic, c.response_topic) == ((), None, None, None)
    assert c.security_protocol == "PLAINTEXT"
    options = consumer_options(c)
    assert options["enable_auto_commit"] is False, "commits are manual, at the watermark"
    assert options["auto_offset_reset"] == "earliest"
    assert options["group_id"] == "fastconn"
    assert options["bootstrap_servers"] == ["kafka:9092"]
    assert options["max_partition_fetch_bytes"] == 1048576
    assert "sasl_mechanism" not in options and "ssl_context" not in options


def test_brokers_from_the_openfaas_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("broker_host", raising=False)
    monkeypatch.setenv("broker_hosts", "k1:9092, k2:9093")
    assert KafkaConfig.model_validate({}).brokers == ("k1:9092", "k2:9093")
    assert KafkaConfig.model_validate({"brokers": ["own:1"]}).brokers == ("own:1",), "the file wins"
    monkeypatch.delenv("broker_hosts")
    monkeypatch.setenv("broker_host", "kafka:9092")
    assert KafkaConfig.model_validate({}).brokers == ("kafka:9092",)
    monkeypatch.delenv("broker_host")
    assert "broker_hosts" in _problems({})["sources[0].brokers"]


def test_config_aliases_and_lists() -> None:
    c = KafkaConfig.model_validate({"brokers": "a:1,b:2", "topics": "t1, t2", "initial_offset": "newest"})
    assert c.brokers == ("a:1", "b:2")
    assert c.topics == ("t1", "t2")
    assert c.initial_offset == "latest"
    assert (
        KafkaConfig.model_validate({"brokers": ["a:1"], "initial_offset": "oldest"}).initial_offset
        == "earliest"
    )


@pytest.mark.parametrize(
    ("source", "location", "message"),
    [
        ({"brokers": ["nohost"]}, "sources[0].brokers", "host:port"),
        (
            {"brokers": ["a:1"], "topics": ["t"], "topic_pattern": "t.*"},
            "sources[0].topic_pattern",
            "not both",
        ),
        ({"brokers": ["a:1"], "topic_pattern": "("}, "sources[0].topic_pattern", "regular expression"),
        ({"brokers": ["a:1"], "topics": ["bad topic"]}, "sources[0].topics", "Kafka topic name"),
        (
            {"brokers": ["a:1"], "topics": ["t"], "dead_letter_topic": "t"},
            "sources[0].dead_letter_topic",
            "loop",
        ),
        (
            {"brokers": ["a:1"], "topic_pattern": "ev-.*", "response_topic": "ev-out"},
            "sources[0].response_topic",
            "loop",
        ),
        ({"brokers": ["a:1"], "ordering": "global"}, "sources[0].ordering", "partition"),
        ({"brokers": ["a:1"], "initial_offset": "middle"}, "sources[0].initial_offset", "earliest"),
        (
            {"brokers": ["a:1"], "heartbeat_interval": 5, "session_timeout": 5},
            "sources[0].heartbeat_interval",
            "below session_timeout",
        ),
        (
            {"brokers": ["a:1"], "retry_backoff_initial": 5, "retry_backoff_max": 1},
            "sources[0].retry_backoff_max",
            ">= retry_backoff_initial",
        ),
        (
            {"brokers": ["a:1"], "sasl_username": "u"},
            "sources[0].sasl_username",
            "SASL_PLAINTEXT or SASL_SSL",
        ),
        ({"brokers": ["a:1"], "tls_ca": "/ca.pem"}, "sources[0].tls_ca", "SSL or SASL_SSL"),
        (
            {"brokers": ["a:1"], "security_protocol": "SSL", "tls_key": "/k.pem"},
            "sources[0].tls_key",
            "tls_cert",
        ),
        (
            {
                "brokers": ["a:1"],
                "security_protocol": "SASL_SSL",
                "sasl_username": "u",
                "sasl_password": "p",
                "sasl_password_file": "/p",
            },
            "sources[0].sasl_password_file",
            "not both",
        ),
        (
            {
                "brokers": ["a:1"],
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "GSSAPI",
                "sasl_username": "u",
                "sasl_password": "p",
            },
            "sources[0].sasl_mechanism",
            "SCRAM-SHA-512",
        ),
        (
            {"brokers": ["a:1"], "security_protocol": "SASL_PLAINTEXT"},
            "sources[0]",
            "sasl_username and sasl_password",
        ),
        ({"brokers": ["a:1"], "max_bytes": 10}, "sources[0].max_bytes", "1024"),
        ({"brokers": ["a:1"], "group": "g"}, "sources[0].group", "group_id"),
    ],
)
def test_config_problems_point_at_the_key(source: dict[str, Any], location: str, message: str) -> None:
    problems = _problems(source)
    assert location in problems, problems
    assert message in problems[location], problems[location]


def test_sasl_scram_maps_to_aiokafka() -> None:
    c = KafkaConfig.model_validate(
        {
            "brokers": ["a:1"],
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "alice",
            "sasl_password": "s3cret",
        }
    )
    options = client_options(c)
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("alice", "s3cret")
    assert "ssl_context" not in options
    plain = KafkaConfig.model_validate(
        {
            "brokers": ["a:1"],
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_username": "u",
            "sasl_password": "p",
        }
    )
    assert client_options(plain)["sasl_mechanism"] == "PLAIN", "PLAIN by default"


def test_sasl_credentials_from_files_and_tls_context(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("bob\n")
    (tmp_path / "password").write_text("pa55word\n")
    (tmp_path / "ca.pem").write_text(_TEST_CERT)
    (tmp_path / "cert.pem").write_text(_TEST_CERT)
    (tmp_path / "key.pem").write_text(_TEST_KEY)
    c = KafkaConfig.model_validate(
        {
            "brokers": ["a:1"],
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username_file": str(tmp_path / "user"),
            "sasl_password_file": str(tmp_path / "password"),
            "tls_ca": str(tmp_path / "ca.pem"),
            "tls_cert": str(tmp_path / "cert.pem"),
            "tls_key": str(tmp_path / "key.pem"),
        }
    )
    options = client_options(c)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("bob", "pa55word")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(cert["subject"] == ((("commonName", "fastconn-test"),),) for cert in context.get_ca_certs())
    producer = producer_options(c)
    assert producer["sasl_plain_username"] == "bob" and isinstance(producer["ssl_context"], ssl.SSLContext)
    tls_only = KafkaConfig.model_validate({"brokers": ["a:1"], "security_protocol": "SSL"})
    assert isinstance(client_options(tls_only)["ssl_context"], ssl.SSLContext), "system CAs by default"


def test_unreadable_secret_files_fail_at_start_with_a_clear_error(tmp_path: Path) -> None:
    c = KafkaConfig.model_validate(
        {
            "brokers": ["a:1"],
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_username": "u",
            "sasl_password_file": str(tmp_path / "missing"),
        }
    )
    with pytest.raises(SourceError, match="sasl_password_file"):
        client_options(c)
    (tmp_path / "bad.pem").write_text("not a certificate")
    c = KafkaConfig.model_validate(
        {"brokers": ["a:1"], "security_protocol": "SSL", "tls_ca": str(tmp_path / "bad.pem")}
    )
    with pytest.raises(SourceError, match="TLS"):
        client_options(c)


def test_function_headers_encode_what_http_cannot_carry() -> None:
    headers = dict(
        function_headers(
            "t",
            2,
            41,
            key="ключ".encode(),
            record_headers=[
                ("trace id", b"x\r\ny"),
                ("Offset", b"999"),
                ("ok", b"fine"),
                ("x-Enc", b"b64"),
                ("", b""),
            ],
        )
    )
    assert headers["X-Kafka-Topic"] == "t"
    assert headers["X-Kafka-Partition"] == "2"
    assert headers["X-Kafka-Offset"] == "41", "a record header cannot spoof the offset"
    assert base64.b64decode(headers["X-Kafka-Key"]).decode() == "ключ", "non-ASCII keys go as base64"
    assert headers["X-Kafka-Key-Enc"] == "b64"
    assert base64.b64decode(headers["X-Kafka-trace-id"]) == b"x\r\ny", "no header injection"
    assert headers["X-Kafka-trace-id-Enc"] == "b64"
    assert headers["X-Kafka-ok"] == "fine"
    assert "X-Kafka-x-Enc" not in headers
    assert len([k for k in headers if k.lower() == "x-kafka-offset"]) == 1


async def test_rebalance_redelivers_a_held_message_first_and_keeps_key_order(kafka_broker: Broker) -> None:
    """A0 waits for a long redelivery backoff while A1 queues behind its key. A second member
    joins: the revoke redelivers A0 at once (not after the backoff), so A1 still follows A0,
    then the partitions are committed and handed over; nothing is lost."""
    topic = await kafka_broker.create_topic(_name("handover"), 2)
    group = _name("g")
    options = DispatchOptions(max_attempts=1, timeout=10.0)
    records = [{"value": b"A0", "key": b"A", "partition": 0}, {"value": b"A1", "key": b"A", "partition": 0}]
    records += [{"value": f"B{i}".encode(), "key": b"B", "partition": 1} for i in range(5)]
    async with KafkaFunction(statuses={b"A0": [503, 200]}) as fn:
        functions = [FunctionTarget("fn", (topic,), fn.url("/fn"))]
        config = _source(kafka_broker, [topic], group, retry_backoff_initial=30, retry_backoff_max=30)
        async with running_source(config, functions, options) as first:
            await kafka_broker.produce(topic, records)
            await wait_for(lambda: fn.seen.get(b"A0") and fn.seen.get(b"B4"), 15, what="A0 failed, B flowed")
            assert first.source.stuck_messages == 1
            assert not fn.seen.get(b"A1")
            async with running_source(config, functions, options) as second:
                await wait_for(lambda: fn.seen.get(b"A1"), 15, what="A1 after the handover")

                async def committed() -> bool:
                    return await kafka_broker.committed(group, topic, 2) == {0: 2, 1: 5}

                await wait_for(committed, 15, 0.2, "both partitions committed")
                assert first.source.stuck_messages == 0

                def shared() -> bool:
                    mine, theirs = len(list(first.source.partitions())), len(list(second.source.partitions()))
                    return mine == theirs == 1

                await wait_for(shared, 15, what="the two members sharing the two partitions")
    a0_calls = [c.at for c in fn.calls if c.body == b"A0"]
    assert len(a0_calls) == 2 and a0_calls[1] - a0_calls[0] < 20, "redelivered at the revoke, not after 30s"
    ok_a0 = next(t for b, s, t in fn.finished if b == b"A0" and s == 200)
    assert all(c.at > ok_a0 for c in fn.calls if c.body == b"A1"), "A1 only after A0 succeeded"
    assert fn.seen[b"A1"] == 1


async def test_full_dispatcher_stops_fetching(kafka_broker: Broker) -> None:
    """With a small dispatcher queue and a large partition budget, the core's capacity is the
    bound: the source takes no more records than fit."""
    topic = await kafka_broker.create_topic(_name("full"), 1)
    group = _name("g")
    gate = asyncio.Event()
    options = DispatchOptions(max_inflight=8, max_queued=40, batch_size=16, max_attempts=1, timeout=30.0)
    async with KafkaFunction(gate_all=gate) as fn:
        config = _source(kafka_broker, [topic], group, ordering="none")
        async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))], options) as h:
            await kafka_broker.produce(
                topic, [{"value": f"f{i}".encode()} for i in range(300)], pipelined=True
            )
            await wait_for(lambda: fn.concurrent == 8, 15, what="the function saturated")
            await asyncio.sleep(1.0)
            received = h.sample("fastconn_messages_received_total", source="kafka", topic=topic)
            assert received <= 40, f"no more than the dispatcher's queue taken from Kafka, got {received}"
            assert not h.source.consumer.paused(), "the partition budget was not the limit here"
            gate.set()
            await wait_for(lambda: len(fn.finished) >= 300, 30, what="everything once the function recovers")
    assert sorted(b for b, _, _ in fn.finished) == sorted(f"f{i}".encode() for i in range(300))
