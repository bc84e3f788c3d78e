"""``decode = "s3"`` on the broker sources (MinIO's NATS, JetStream, Kafka, AMQP, MQTT and
Postgres targets): a notification of several records published on the real broker reaches the
functions as one call per record, and the broker message is settled only once every record
is (a failing record keeps it unacknowledged: the broker delivers it again)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from fastconn import testing
from fastconn.dispatcher import DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict
from fastconn.record_split import DECODE_FUNCTION, split_records
from fastconn.testing import FunctionDouble, wait_for
from kafka_fixtures import Broker as KafkaBroker
from kafka_fixtures import kafka_broker
from mqtt_fixtures import Mosquitto, mosquitto, mqtt_source
from mqtt_fixtures import publish as mqtt_publish
from nats_fixtures import NatsServer, connected, nats_server
from postgres_fixtures import Cluster, pg_cluster
from rabbitmq_fixtures import Broker as RabbitBroker
from rabbitmq_fixtures import drained, rabbit, rabbit_source
from test_s3_events import minio_body

__all__ = ["kafka_broker", "mosquitto", "nats_server", "pg_cluster", "rabbit"]  # fixtures, used by name


def _bucket() -> str:
    return f"bucket.{uuid.uuid4().hex[:8]}"  # a dot: the topic form keeps it one level


def notification(bucket: str, objects: Sequence[tuple[str, str]]) -> bytes:
    """What MinIO's targets publish for ``objects`` (``(key, event name)``): one record each."""
    body = minio_body()
    template = body["Records"][0]
    records = []
    for i, (key, event) in enumerate(objects):
        record = copy.deepcopy(template)
        record["eventName"] = event
        record["s3"]["bucket"]["name"] = bucket
        record["s3"]["object"]["key"] = key
        record["s3"]["object"]["sequencer"] = f"17A{i}"
        records.append(record)
    body["Records"] = records
    return json.dumps(body).encode()


THREE = (
    ("a+b.png", "s3:ObjectCreated:Put"),
    ("c.png", "s3:ObjectCreated:Put"),
    ("d.png", "s3:ObjectCreated:Copy"),
)
"""Three records (MinIO URL-encodes keys: ``a+b.png`` is ``a b.png``)."""


ONE_ATTEMPT = DispatchOptions(max_attempts=1, timeout=10.0)
"""For the failure tests: the harness's default second attempt would hide a 503 from the source."""


def functions(double: FunctionDouble, bucket: str) -> list[FunctionTarget]:
    return [
        FunctionTarget("created", (f"s3/{bucket}/ObjectCreated/#",), double.url("/created")),
        FunctionTarget("removed", (f"s3/{bucket}/ObjectRemoved/#",), double.url("/removed")),
    ]


@contextlib.asynccontextmanager
async def running(
    config: Mapping[str, Any], targets: Sequence[FunctionTarget], options: DispatchOptions | None = None
) -> AsyncIterator[Any]:
    """The source of ``config`` in process, as the daemon builds it from its config table."""
    module = importlib.import_module(f"fastconn.sources.{config['type']}")
    source = module.create(module.CONFIG_MODEL.model_validate(dict(config)))
    async with testing.running_source(source, targets, options) as harness:
        yield harness


def assert_three_records(double: FunctionDouble, bucket: str) -> None:
    calls = sorted(double.calls_to("/created"), key=lambda c: c.headers["X-S3-Key"])
    assert [c.headers["X-S3-Key"] for c in calls] == ["a b.png", "c.png", "d.png"]
    assert [c.headers["X-S3-Event"] for c in calls] == [
        "ObjectCreated:Put",
        "ObjectCreated:Put",
        "ObjectCreated:Copy",
    ]
    assert [c.headers["X-Topic"] for c in calls] == [
        f"s3/{bucket}/ObjectCreated/Put",
        f"s3/{bucket}/ObjectCreated/Put",
        f"s3/{bucket}/ObjectCreated/Copy",
    ]
    assert {c.headers["X-S3-Bucket"] for c in calls} == {bucket}
    assert len({c.headers["X-Message-Id"] for c in calls}) == 3  # one stable id per record
    for call in calls:
        record = json.loads(call.body)
        assert "Records" not in record and record["s3"]["object"]["key"] in ("a+b.png", "c.png", "d.png")


async def test_nats_notification_one_call_per_record(
    nats_server: NatsServer, function_double: FunctionDouble
) -> None:
    bucket, subject = _bucket(), f"minio.{uuid.uuid4().hex[:8]}"
    config = {"type": "nats", "servers": [nats_server.url], "subjects": [subject], "decode": "s3"}
    async with running(config, functions(function_double, bucket)), connected(nats_server.url) as nc:
        await nc.publish(subject, notification(bucket, THREE), headers={"X-Tenant": "acme"})
        await wait_for(lambda: len(function_double.calls) == 3, 10, what="three record calls")
    assert_three_records(function_double, bucket)
    assert {c.headers["X-Tenant"] for c in function_double.calls} == {"acme"}  # the carrier's headers kept


async def test_jetstream_failed_record_keeps_the_message_until_every_record_succeeds(
    nats_server: NatsServer, function_double: FunctionDouble
) -> None:
    bucket, suffix = _bucket(), uuid.uuid4().hex[:8]
    stream, subject = f"MINIO{suffix}", f"minio.js.{suffix}"
    function_double.script("/removed", [503, 200])
    config = {
        "type": "jetstream",
        "servers": [nats_server.url],
        "stream": stream,
        "subjects": [subject],
        "create_stream": True,
        "nak_delay": "100ms",
        "decode": "s3",
    }
    objects = (("a+b.png", "s3:ObjectCreated:Put"), ("old.png", "s3:ObjectRemoved:Delete"))
    async with (
        running(config, functions(function_double, bucket), ONE_ATTEMPT),
        connected(nats_server.url) as nc,
    ):
        js = nc.jetstream()
        await js.publish(subject, notification(bucket, objects))

        async def acked() -> bool:
            info = await js.consumer_info(stream, "fastconn")
            return bool(info.ack_floor.stream_seq == 1 and info.num_ack_pending == 0)

        await wait_for(acked, 15, 0.05, "the message acknowledged")
    removed, created = function_double.calls_to("/removed"), function_double.calls_to("/created")
    assert [c.status for c in removed] == [503, 200]
    # Not acknowledged after the failed record: the server delivered the message again, so
    # the record that had succeeded ran again too (same record id: functions can drop it).
    assert [c.headers["X-Delivery-Attempt"] for c in removed] == ["1", "2"]
    assert [c.headers["X-Delivery-Attempt"] for c in created] == ["1", "2"]
    assert len({c.headers["X-Message-Id"] for c in created}) == 1
    assert removed[0].headers["X-Topic"] == f"s3/{bucket}/ObjectRemoved/Delete"


async def test_jetstream_dead_letters_a_message_that_is_not_a_notification(
    nats_server: NatsServer, function_double: FunctionDouble
) -> None:
    """Not a notification: a final failure, dead-lettered with the reason as any failed message
    is; the ``s3:TestEvent`` next to it is acknowledged without a call."""
    bucket, suffix = _bucket(), uuid.uuid4().hex[:8]
    stream, dlq, subject = f"MINIO{suffix}", f"DLQ{suffix}", f"minio.bad.{suffix}"
    config = {
        "type": "jetstream",
        "servers": [nats_server.url],
        "stream": stream,
        "subjects": [subject],
        "create_stream": True,
        "dead_letter_subject": f"dlq.{suffix}",
        "decode": "s3",
    }
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket}
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=dlq, subjects=[f"dlq.{suffix}"])
        async with running(config, functions(function_double, bucket)):
            await js.publish(subject, b'{"hello": 1}')
            await js.publish(subject, json.dumps(test_event).encode())

            async def settled() -> bool:
                info = await js.consumer_info(stream, "fastconn")
                dead = await js.stream_info(dlq)
                return bool(info.ack_floor.stream_seq == 2 and dead.state.messages == 1)

            await wait_for(settled, 10, 0.05, "both settled, one dead-lettered")
        dead = await js.get_msg(dlq, 1)
    assert dead.data == b'{"hello": 1}'
    headers = dead.headers or {}
    assert headers["fastconn-dlt-function"] == DECODE_FUNCTION
    assert "no 'Records' array" in headers["fastconn-dlt-response"]
    assert function_double.calls == []


async def test_kafka_notification_one_call_per_record_then_commit(
    kafka_broker: KafkaBroker, function_double: FunctionDouble
) -> None:
    bucket = _bucket()
    topic = await kafka_broker.create_topic(f"minio-{uuid.uuid4().hex[:8]}", 1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = {
        "type": "kafka",
        "brokers": [kafka_broker.bootstrap],
        "topics": [topic],
        "group_id": group,
        "session_timeout": 3,
        "heartbeat_interval": 0.5,
        "commit_interval": 0.2,
        "decode": "s3",
    }
    async with running(config, functions(function_double, bucket)):
        await kafka_broker.produce(topic, [{"value": notification(bucket, THREE), "key": b"images/a b.png"}])
        await wait_for(lambda: len(function_double.calls) == 3, 20, what="three record calls")

        async def committed() -> bool:
            return await kafka_broker.committed(group, topic, 1) == {0: 1}

        await wait_for(committed, 10, 0.1, "the offset committed past the notification")
    assert_three_records(function_double, bucket)
    assert {c.headers["X-Kafka-Topic"] for c in function_double.calls} == {topic}


async def test_rabbitmq_notification_one_call_per_record_and_a_failed_record_redelivers(
    rabbit: RabbitBroker, function_double: FunctionDouble
) -> None:
    bucket, queue = _bucket(), rabbit.names.queue("minio")
    function_double.script("/removed", [503, 200])
    config = {**rabbit_source(rabbit.names.prefix, [queue]), "decode": "s3"}
    objects = (*THREE, ("old.png", "s3:ObjectRemoved:Delete"))
    async with running(config, functions(function_double, bucket), ONE_ATTEMPT):
        await rabbit.publish(queue, notification(bucket, objects), message_id="minio-1")
        await wait_for(
            lambda: len(function_double.calls_to("/removed")) == 2, 15, what="the failed record again"
        )
        await drained(rabbit.channel, queue)
    first_round = function_double.calls_to("/created")[:3]
    assert [c.headers["X-Rabbitmq-Msg-Id"] for c in first_round] == ["minio-1"] * 3
    assert [c.status for c in function_double.calls_to("/removed")] == [503, 200]
    assert len(function_double.calls_to("/created")) == 6  # the whole message came back once


async def test_mqtt_notification_one_call_per_record(
    mosquitto: Mosquitto, function_double: FunctionDouble
) -> None:
    bucket, topic = _bucket(), f"minio/{uuid.uuid4().hex[:8]}"
    config = mqtt_source(mosquitto, topics=[topic], decode="s3")
    async with running(config, functions(function_double, bucket)):
        await mqtt_publish(mosquitto.port, topic, [notification(bucket, THREE)])
        await wait_for(lambda: len(function_double.calls) == 3, 10, what="three record calls")
    assert_three_records(function_double, bucket)
    assert {c.headers["X-Mqtt-Qos"] for c in function_double.calls} == {"1"}  # the carrier's headers kept


async def test_postgres_notify_notification_one_call_per_record(
    pg_cluster: Cluster, function_double: FunctionDouble
) -> None:
    bucket, channel = _bucket(), f"minio_{uuid.uuid4().hex[:8]}"
    config = {
        "type": "postgres",
        "mode": "notify",
        "dsn": pg_cluster.dsn,
        "channels": [channel],
        "decode": "s3",
    }
    async with running(config, functions(function_double, bucket)):
        await pg_cluster.execute("SELECT pg_notify($1, $2)", channel, notification(bucket, THREE).decode())
        await wait_for(lambda: len(function_double.calls) == 3, 10, what="three record calls")
    assert_three_records(function_double, bucket)


@pytest.mark.parametrize("source", ["nats", "jetstream", "kafka", "rabbitmq", "mqtt", "postgres"])
def test_decode_refuses_other_values_naming_the_key(source: str) -> None:
    module = importlib.import_module(f"fastconn.sources.{source}")
    required: dict[str, dict[str, Any]] = {
        "nats": {"subjects": ["a"]},
        "jetstream": {"stream": "S", "subjects": ["a"]},
        "kafka": {"topics": ["a"], "brokers": ["localhost:9092"]},
        "rabbitmq": {"queues": ["q"], "url": "amqp://guest:guest@localhost:5672/"},
        "mqtt": {"topics": ["a"]},
        "postgres": {"mode": "notify", "channels": ["c"]},
    }
    config = {"type": source, **required[source]}
    assert module.CONFIG_MODEL.model_validate({**config, "decode": "s3"}).decode == "s3"
    with pytest.raises(ValidationError) as caught:
        module.CONFIG_MODEL.model_validate({**config, "decode": "minio"})
    assert caught.value.errors()[0]["loc"] == ("decode",)


@pytest.mark.parametrize(
    "config",
    [{"type": "jetstream", "stream": "S"}, {"type": "kafka", "brokers": ["localhost:9092"], "topics": ["t"]}],
    ids=["jetstream", "kafka"],
)
def test_stored_events_are_not_decoded_again(config: dict[str, Any]) -> None:
    module = importlib.import_module(f"fastconn.sources.{config['type']}")
    with pytest.raises(ValidationError, match="decode = 's3' with stored_events"):
        module.CONFIG_MODEL.model_validate({**config, "stored_events": True, "decode": "s3"})


def test_postgres_wal_mode_has_no_s3_decode() -> None:
    module = importlib.import_module("fastconn.sources.postgres")
    with pytest.raises(ValidationError, match="decode = 's3' is for mode = 'notify'"):
        module.CONFIG_MODEL.model_validate({"type": "postgres", "decode": "s3"})


# -- the settle rule, without a broker -----------------------------------------------------


def _outcome(record: Message, verdict: Verdict, status: int) -> Outcome:
    result = TargetResult("fn", status, ErrorKind.NONE, 1, 0.01)
    return Outcome(record, verdict, record.message_id or "", (result,))


async def test_one_outcome_per_message_once_every_record_is_final_worst_first() -> None:
    carriers = [
        Message("in", notification("b", THREE), message_id="m1"),
        Message("in", notification("b", THREE[:2]), message_id="m2"),
    ]
    got: list[Outcome] = []
    split = split_records(carriers, got.extend)
    records, collect = split.records, split.on_outcomes
    assert len(records) == 5
    collect([_outcome(records[0], Verdict.OK, 200), _outcome(records[3], Verdict.OK, 200)])
    collect([_outcome(records[1], Verdict.FAILED, 400)])
    assert got == []  # neither message has all its records yet
    collect([_outcome(records[4], Verdict.UNROUTED, 0), _outcome(records[2], Verdict.RETRY, 503)])
    by_id = {o.message_id: o for o in got}
    assert [o.message for o in got] == [carriers[1], carriers[0]]
    assert by_id["m1"].verdict is Verdict.RETRY and [r.status for r in by_id["m1"].results] == [503]
    assert by_id["m2"].verdict is Verdict.OK and not by_id["m2"].key_held


async def test_undecodable_and_test_event_messages_settle_without_a_call() -> None:
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}).encode()
    carriers = [Message("in", b"not json", message_id="bad"), Message("in", test_event, message_id="test")]
    got: list[Outcome] = []
    split = split_records(carriers, got.extend)
    assert split.records == [] and split.without_records == carriers
    split.settle_without_records()
    assert got == []  # on the next loop iteration: the source's submit call returns first
    await wait_for(lambda: len(got) == 2, 5, what="the immediate outcomes")
    bad, test = got
    assert bad.verdict is Verdict.FAILED and bad.results[0].function == DECODE_FUNCTION
    assert b"not an S3 event notification" in (bad.results[0].body or b"")
    assert test.verdict is Verdict.UNROUTED
