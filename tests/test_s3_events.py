"""``fastconn.s3_events``: S3 and MinIO notifications (from the documented examples) decoded
into one message per record, and bad bodies refused with a reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fastconn import Dispatcher, DispatchOptions, FunctionTarget
from fastconn.s3_events import S3EventError, decode_notification, event_topic, record_id


def aws_record(
    bucket: str = "img.example.com", key: str = "photos/my+cat%2B1.jpg", **obj: Any
) -> dict[str, Any]:
    """A record as AWS documents it ("Event message structure")."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-12-03T10:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "cfg",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": key,
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "versionId": "v1",
                "sequencer": "0055AED6DCD90281E5",
                **obj,
            },
        },
    }


def minio_body() -> dict[str, Any]:
    """What MinIO's webhook target posts (minio ``cmd/event-notification.go``)."""
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": "images/a b.png",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": "2026-12-03T10:00:00.000Z",
                "eventName": "s3:ObjectCreated:Put",
                "userIdentity": {"principalId": "minioadmin"},
                "requestParameters": {
                    "principalId": "minioadmin",
                    "region": "",
                    "sourceIPAddress": "127.0.0.1",
                },
                "responseElements": {
                    "x-minio-deployment-id": "d",
                    "x-minio-origin-endpoint": "http://127.0.0.1:9000",
                },
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {
                        "name": "images",
                        "ownerIdentity": {"principalId": "minioadmin"},
                        "arn": "arn:aws:s3:::images",
                    },
                    "object": {
                        "key": "a+b.png",
                        "size": 3,
                        "eTag": "abc",
                        "contentType": "image/png",
                        "userMetadata": {},
                        "sequencer": "17A",
                    },
                },
                "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO"},
            }
        ],
    }


def test_aws_records_become_one_message_each_with_decoded_keys() -> None:
    second = aws_record(key="a%2Fb+c.txt")
    second["eventName"] = "ObjectRemoved:Delete"
    del second["s3"]["object"]["size"]
    records = decode_notification(json.dumps({"Records": [aws_record(), second]}).encode())
    assert [r.topic for r in records] == [
        "s3/img.example.com/ObjectCreated/Put",
        "s3/img.example.com/ObjectRemoved/Delete",
    ]
    first = records[0]
    assert dict(first.headers) == {
        "X-S3-Bucket": "img.example.com",
        "X-S3-Key": "photos/my cat+1.jpg",  # '+' is a space, '%2B' a plus
        "X-S3-Event": "ObjectCreated:Put",
        "X-S3-Size": "1024",
        "X-S3-Version-Id": "v1",
    }
    assert json.loads(first.body) == aws_record()  # the record alone
    assert "X-S3-Size" not in dict(records[1].headers)
    assert dict(records[1].headers)["X-S3-Key"] == "a/b c.txt"


def test_minio_and_aws_route_alike() -> None:
    (record,) = decode_notification(minio_body())
    assert record.topic == "s3/images/ObjectCreated/Put"
    assert record.event == "ObjectCreated:Put"
    assert record.key == "a b.png"
    assert "X-S3-Version-Id" not in dict(record.headers)


def test_sns_envelope_is_unwrapped() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "m",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
        "Message": json.dumps({"Records": [aws_record()]}),
    }
    (record,) = decode_notification(json.dumps(envelope))
    assert record.bucket == "img.example.com"


def test_test_event_has_no_records() -> None:
    body = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "t",
        "Bucket": "b",
        "RequestId": "r",
        "HostId": "h",
    }
    assert decode_notification(json.dumps(body)) == ()


def test_message_ids_are_stable_and_tell_events_apart() -> None:
    a = decode_notification({"Records": [aws_record()]})[0].message_id
    again = decode_notification({"Records": [aws_record()]})[0].message_id
    other_version = decode_notification({"Records": [aws_record(versionId="v2")]})[0].message_id
    other_sequencer = decode_notification({"Records": [aws_record(sequencer="0055AED6DCD90281E6")]})[
        0
    ].message_id
    assert a == again
    assert len({a, other_version, other_sequencer}) == 3
    # The parts are length-prefixed: moving a character between them changes the id.
    assert record_id("ab", "c", "", "", "e") != record_id("a", "bc", "", "", "e")


async def test_router_wildcards_select_bucket_and_event() -> None:
    """The topic form works with the core's '/' wildcards; dots in bucket names stay literal."""
    patterns = {
        "bucket": "s3/img.example.com/#",
        "creates": "s3/+/ObjectCreated/#",
        "deletes": "s3/+/ObjectRemoved/Delete",
        "other_bucket": "s3/img/#",
    }
    async with Dispatcher(DispatchOptions()) as dispatcher:
        dispatcher.set_functions(
            FunctionTarget(name, (pattern,), "http://127.0.0.1:9/") for name, pattern in patterns.items()
        )
        routes = dispatcher.route(
            [
                event_topic("img.example.com", "s3:ObjectCreated:Put"),
                event_topic("img.example.com", "ObjectRemoved:Delete"),
                event_topic("img", "ObjectRemoved:DeleteMarkerCreated"),
            ]
        )
    assert [sorted(r) for r in routes] == [["bucket", "creates"], ["bucket", "deletes"], ["other_bucket"]]
    assert event_topic("b", "ReducedRedundancyLostObject") == "s3/b/ReducedRedundancyLostObject"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"hello": 1}', "no 'Records' array (top-level keys: hello)"),
        (b'{"Records": {}}', "'Records' must be an array"),
        (b'{"Records": [1]}', "Records[0]: expected an object"),
        (b'{"Records": [{"s3": {}}]}', "Records[0].eventName: missing"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "Records[0].s3: missing"),
        (
            b'{"Records": [{"eventName": "x", "s3": {"bucket": {"name": "a/b"}, "object": {"key": "k"}}}]}',
            "contains '/'",
        ),
        (
            b'{"Records": [{"eventName": "x", "s3": {"bucket": {"name": "b"}, "object": {}}}]}',
            "Records[0].s3.object.key",
        ),
        (b'{"Type": "Notification", "Message": "nope"}', "SNS envelope: 'Message' is not JSON"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_bodies_name_the_problem(body: bytes, reason: str) -> None:
    with pytest.raises(S3EventError, match=None) as caught:
        decode_notification(body)
    assert reason in str(caught.value)


def test_a_key_http_cannot_carry_stays_in_the_body_only() -> None:
    (record,) = decode_notification({"Records": [aws_record(key="line%0Abreak")]})
    assert "X-S3-Key" not in dict(record.headers)
    assert record.key == "line\nbreak"
