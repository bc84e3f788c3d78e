"""Kafka: a dead letter the broker refuses as too large is sent smaller, so its message is done
and the commit moves on (it used to be retried forever, holding the commit, uncounted)."""

from __future__ import annotations

from fastconn.deadletter import DLT_HEADERS_DROPPED, DLT_PREFIX, DLT_RESPONSE, DLT_TRUNCATED
from fastconn.functions import FunctionTarget
from fastconn.sources.kafka.settle import TRUNCATED_PAYLOAD, smaller_dead_letter
from fastconn.testing import wait_for
from kafka_fixtures import Broker, KafkaFunction, kafka_broker, running_source
from nats_fixtures import unique

__all__ = ["kafka_broker"]  # the fixture is used by name

CONTEXT = [("fastconn-dlt-function", b"fn"), (DLT_RESPONSE, b"no")]


def test_first_the_payload_is_cut_then_the_headers_go_then_nothing_is_left_to_try() -> None:
    value = b"v" * (TRUNCATED_PAYLOAD + 1)
    headers = [("origin", b"x"), *CONTEXT]
    cut = smaller_dead_letter(value, headers, 1)
    assert cut == (value[:TRUNCATED_PAYLOAD], [*headers, (DLT_TRUNCATED, str(len(value)).encode())])
    bare = smaller_dead_letter(value, headers, 2)
    assert bare == (
        value[:TRUNCATED_PAYLOAD],
        [CONTEXT[0], (DLT_TRUNCATED, str(len(value)).encode()), (DLT_HEADERS_DROPPED, b"1")],
    )
    assert smaller_dead_letter(value, headers, 3) is None


def test_forms_that_would_not_be_smaller_are_skipped() -> None:
    small = b"v" * 10
    assert smaller_dead_letter(small, [("origin", b"x"), *CONTEXT], 1) == (
        small,
        [CONTEXT[0], (DLT_HEADERS_DROPPED, b"1")],
    )
    only_context = [("fastconn-dlt-function", b"fn")]
    assert smaller_dead_letter(small, only_context, 1) is None
    big = b"v" * (TRUNCATED_PAYLOAD * 2)
    assert smaller_dead_letter(big, only_context, 2) is None
    assert all(k.startswith(DLT_PREFIX) for k, _ in smaller_dead_letter(big, only_context, 1)[1])  # type: ignore[index]


async def test_an_oversized_dead_letter_is_sent_cut_and_the_commit_moves_on(kafka_broker: Broker) -> None:
    topic = await kafka_broker.create_topic(unique("big"), 1)
    dlt = unique("big-dlt")
    group = unique("g")
    big_payload = b"B" * 100_000
    big_headers = [(f"trace{i}", b"t" * 7000) for i in range(10)]  # each fits an HTTP header line
    records = [
        {"value": b"ok0"},
        {"value": big_payload, "headers": [("origin", b"test")]},  # too large: payload cut
        {"value": b"ok2"},
        {"value": b"small", "headers": big_headers},  # too large: its own headers left out
        {"value": b"ok4"},
    ]
    statuses = {big_payload: [400], b"small": [400]}
    # max_bytes 1024: the producer's max_request_size is 1024 + 64 KiB, below both dead letters.
    config = {
        "type": "kafka",
        "brokers": [kafka_broker.bootstrap],
        "topics": [topic],
        "group_id": group,
        "commit_interval": 0.2,
        "dead_letter_topic": dlt,
        "max_bytes": 1024,
    }
    async with (
        KafkaFunction(statuses=statuses) as fn,
        running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h,
    ):
        await kafka_broker.produce(topic, records)

        async def all_committed() -> bool:
            return await kafka_broker.committed(group, topic, 1) == {0: len(records)}

        await wait_for(all_committed, 20, 0.2, "the commit past both dead-lettered messages")
        assert h.sample("fastconn_kafka_dead_lettered_total", source="kafka") == 2
        assert h.sample("fastconn_kafka_dead_letters_shrunk_total", source="kafka") == 2
        assert h.sample("fastconn_kafka_stuck_messages", source="kafka") == 0
    cut, bare = sorted(
        await kafka_broker.read(dlt, 2), key=lambda r: dict(r.headers)["fastconn-dlt-original-offset"]
    )
    cut_headers = dict(cut.headers)
    assert cut.value == big_payload[:TRUNCATED_PAYLOAD]
    assert cut_headers[DLT_TRUNCATED] == b"100000"
    assert cut_headers["origin"] == b"test", "only the payload was cut"
    assert cut_headers["fastconn-dlt-status"] == b"400"
    bare_headers = dict(bare.headers)
    assert bare.value == b"small"
    assert not any(name.startswith("trace") for name in bare_headers)
    assert bare_headers[DLT_HEADERS_DROPPED] == b"10"
    assert DLT_TRUNCATED not in bare_headers
    assert bare_headers["fastconn-dlt-original-offset"] == b"3"
