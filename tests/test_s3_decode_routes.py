"""``decode = "s3"`` on the HTTP routes: MinIO's webhook target posting to a webhook (with and
without its bearer token, against a running daemon), and SNS notifications whose message is an
S3 notification (the decoder the SNS source runs once a notification is verified)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
import pytest

from fastconn.sources.sns import Notification, s3_record_messages
from fastconn.testing import FunctionDouble, wait_for
from test_s3_events import aws_record, minio_body

if TYPE_CHECKING:
    from conftest import DaemonFactory


async def test_minio_webhook_target_records_reach_functions_by_bucket_and_event(
    function_double: FunctionDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession
) -> None:
    config = {
        "functions": [
            {
                "name": "thumbs",
                "url": function_double.url("/thumbs"),
                "topics": ["s3/images/ObjectCreated/#"],
            },
            {"name": "other", "url": function_double.url("/other"), "topics": ["s3/archive/#"]},
        ],
        "sources": [{"type": "webhook", "decode": "s3", "auth_token": "minio-secret"}],
    }
    daemon = await daemon_factory(config)
    url = f"{daemon.url}/webhook/minio"
    body = json.dumps(minio_body()).encode()
    async with http.post(url, data=body) as r:  # MinIO without its auth_token
        assert r.status == 401
    async with http.post(url, data=body, headers={"Authorization": "Bearer minio-secret"}) as r:
        assert r.status == 202, await r.text()
        message_id = r.headers["X-Message-Id"]
    await wait_for(lambda: function_double.calls_to("/thumbs"), 10, what="the record's call")
    (call,) = function_double.calls_to("/thumbs")
    assert call.headers["X-S3-Bucket"] == "images"
    assert call.headers["X-S3-Key"] == "a b.png"
    assert call.headers["X-S3-Event"] == "ObjectCreated:Put"  # MinIO's "s3:" prefix dropped, as AWS
    assert call.headers["X-Message-Id"] == message_id
    assert "Authorization" not in call.headers
    assert json.loads(call.body)["s3"]["bucket"]["name"] == "images"
    assert function_double.calls_to("/other") == []
    async with http.post(url, data=b'{"hello": 1}', headers={"Authorization": "Bearer minio-secret"}) as r:
        assert r.status == 400
        assert "S3 event notification" in (await r.json())["error"]
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "images"}
    async with http.post(
        url, data=json.dumps(test_event).encode(), headers={"Authorization": "Bearer minio-secret"}
    ) as r:
        assert r.status == 202  # nothing to deliver, nothing refused
    assert len(function_double.calls) == 1


def test_sns_decode_s3_makes_one_message_per_record_keeping_the_sns_id() -> None:
    records = {"Records": [aws_record("images", "a.png"), aws_record("images", "b+c.png")]}
    notification = Notification(
        topic_arn="arn:aws:sns:us-east-1:123456789012:uploads",
        message_id="sns-1",
        message=json.dumps(records).encode(),
    )
    messages = s3_record_messages(notification)
    assert [m.topic for m in messages] == ["s3/images/ObjectCreated/Put"] * 2
    keys = [dict(m.headers)["X-S3-Key"] for m in messages]
    assert keys == ["a.png", "b c.png"]
    assert all(dict(m.headers)["X-Sns-Message-Id"] == "sns-1" for m in messages)
    assert len({m.message_id for m in messages}) == 2
    with pytest.raises(ValueError, match="S3"):
        s3_record_messages(Notification("arn:aws:sns:us-east-1:1:t", "sns-2", b'{"not": "s3"}'))
