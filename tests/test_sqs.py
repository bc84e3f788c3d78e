"""SQS source (``type = "sqs"``) against moto in server mode: real HTTP, real SQS API calls."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from aws_fixtures import aws_env, moto_server
from fastconn.sources.sqs import DLT_CONTEXT, DLT_QUEUE_URL
from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from gateway_double import FunctionSpec, GatewayDouble, async_daemon_config
from sqs_fixtures import Sqs, attributes_of, daemon_config, sqs, sqs_source

__all__ = ["aws_env", "moto_server", "sqs"]  # fixtures, used by name


async def test_routing_headers_and_delete(sqs: Sqs, function_double: FunctionDouble, tmp_path: Path) -> None:
    orders, billing = await sqs.queue("orders"), await sqs.queue("billing")
    order_name, billing_name = orders.rpartition("/")[2], billing.rpartition("/")[2]
    # The OpenFaaS --queue-url comma form.
    source = sqs_source(sqs, f"{orders}, {billing}")
    config = daemon_config(function_double, {"fn": [order_name], "bill": [billing_name]}, [source])
    async with DaemonProcess(config, tmp_path):
        first = await sqs.send(orders, '{"id": 1}', {"tenant": "acme", "X-SQS-Message-ID": "spoofed"})
        await sqs.send(billing, "invoice")
        await wait_for(lambda: len(function_double.calls) == 2, 15, 0.05, "two calls")
        await sqs.drained(orders)
        await sqs.drained(billing)
        call = function_double.calls_to("/fn")[0]
        assert call.body == b'{"id": 1}'
        assert call.headers["X-Topic"] == order_name
        assert call.headers["X-Message-Id"] == first
        assert call.headers.getall("X-SQS-Message-ID") == [first]  # the attribute could not spoof it
        assert call.headers["X-SQS-Queue-URL"] == orders
        assert call.headers["X-Sqs-Attr-tenant"] == "acme"
        assert call.headers["X-Delivery-Attempt"] == "1"
        assert function_double.calls_to("/bill")[0].body == b"invoice"


async def test_delete_only_after_success_and_visibility_backoff(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """Two 503s: each time the message stays in the queue, hidden for retry_delay doubling (1s,
    then 2s) by ChangeMessageVisibility; the third call succeeds and only then is it deleted."""
    url = await sqs.queue()
    function_double.script("/fn", [503, 503, 200])
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [sqs_source(sqs, [url])])
    async with DaemonProcess(config, tmp_path):
        await sqs.send(url, "retry me")
        await wait_for(lambda: len(function_double.calls) >= 1, 15, 0.05, "first call")
        await asyncio.sleep(0.3)  # settle the failed call: the message must still be there, hidden
        assert await sqs.counts(url) == (0, 1)
        await wait_for(lambda: len(function_double.calls) == 3, 20, 0.05, "three calls")
        await sqs.drained(url)
        calls = function_double.calls
        assert [c.headers["X-Delivery-Attempt"] for c in calls] == ["1", "2", "3"]
        assert len({c.headers["X-Message-Id"] for c in calls}) == 1
        gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
        assert gaps[0] >= 0.9, gaps  # hidden ~1s (SQS visibility is whole seconds)
        assert gaps[1] >= 1.9, gaps  # then ~2s
    assert len(function_double.calls) == 3


async def test_visibility_extended_for_a_slow_function(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """A call of 5s with a 2s visibility timeout: the message stays hidden throughout (a
    competing consumer never sees it), is called once and deleted after."""
    url = await sqs.queue()
    function_double.script("/fn", [200], delay=5.0)
    source = sqs_source(sqs, [url], visibility_timeout="2s")
    config = daemon_config(
        function_double, {"fn": [url.rpartition("/")[2]]}, [source], function_timeout="20s"
    )
    async with DaemonProcess(config, tmp_path):
        await sqs.send(url, "slow")
        await wait_for(lambda: len(function_double.calls) == 1, 15, 0.05, "the call")
        stolen = []
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:  # the call runs 5s: 2 visibility timeouts and more
            stolen += await sqs.receive_all(url)
            await asyncio.sleep(0.25)
        assert stolen == []
        await sqs.drained(url, timeout=15)
    assert len(function_double.calls) == 1


async def test_async_invocation_deletes_only_after_the_callback_and_keeps_the_message_hidden(
    sqs: Sqs, gateway: GatewayDouble, tmp_path: Path
) -> None:
    """The callback comes 4s after the call, with a 2s visibility timeout: the message stays
    hidden throughout and in the queue until the callback. A failed callback (503, one attempt)
    hands it back for a retry per retry_delay; the good callback of the second call deletes it."""
    url = await sqs.queue()
    gateway.set_functions([FunctionSpec("fn", topic=url.rpartition("/")[2])])
    gateway.script("fn", statuses=[503, 200], callback_delay=[4.0, 0.2])
    source = sqs_source(sqs, [url], visibility_timeout="2s")
    async with DaemonProcess(async_daemon_config(gateway, source, max_attempts=1), tmp_path):
        message_id = await sqs.send(url, "later")
        await wait_for(lambda: gateway.calls("fn") == 1, 15, 0.05, "the async call")
        stolen = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the callback is 4s away: past the visibility timeout
            stolen += await sqs.receive_all(url)
            await asyncio.sleep(0.25)
        assert stolen == []
        assert await sqs.counts(url) == (0, 1), "deleted before its callback"
        await wait_for(lambda: gateway.calls("fn") == 2, 15, 0.05, "the retry after the failed callback")
        await sqs.drained(url, timeout=15)
        # The double records a callback once its answer is read: after the daemon acted on it.
        await wait_for(lambda: len(gateway.callbacks) == 2, what="both callbacks recorded")
        assert [c.function_status for c in gateway.callbacks] == [503, 200]
    requests = gateway.requests_for("fn")
    assert [r.path for r in requests] == ["/async-function/fn.openfaas-fn"] * 2
    assert [r.headers["X-Delivery-Attempt"] for r in requests] == ["1", "2"]
    assert {r.headers["X-Message-Id"] for r in requests} == {message_id}


async def test_final_failure_goes_to_the_queues_redrive_policy(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """A 400 with no dead_letter_queue_url: visible again at once, so SQS's redrive policy
    moves it to its dead-letter queue after maxReceiveCount (2) receives."""
    dlq = await sqs.queue("redrive-dlq")
    policy = json.dumps({"deadLetterTargetArn": await sqs.arn(dlq), "maxReceiveCount": 2})
    url = await sqs.queue("work", RedrivePolicy=policy)
    function_double.script("/fn", [400])
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [sqs_source(sqs, [url])])
    async with DaemonProcess(config, tmp_path) as daemon:
        await sqs.send(url, "poison")

        async def in_dlq() -> bool:
            return (await sqs.counts(dlq))[0] == 1

        await wait_for(in_dlq, 20, 0.1, "the message in the redrive target")
        await sqs.drained(url)
        assert [c.headers["X-Delivery-Attempt"] for c in function_double.calls] == ["1", "2"]
        assert "visible again for the queue's redrive policy" in daemon.output()


async def test_dead_letter_queue_with_context(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """dead_letter_queue_url: a non-retryable failure at once, a retryable one after
    max_deliver receives, each sent there with the failure context, then deleted."""
    url, dlq = await sqs.queue("work"), await sqs.queue("dlq")
    topic = url.rpartition("/")[2]
    function_double.script("/bad", [400])
    function_double.script("/flaky", [503])
    source = sqs_source(sqs, [url], dead_letter_queue_url=dlq, max_deliver=2, retry_delay="1s")
    config = daemon_config(function_double, {"bad": [topic + "-never"], "flaky": [topic]}, [source])
    async with DaemonProcess(config, tmp_path):
        sent = await sqs.send(url, "always 503", {"tenant": "acme"})
        await wait_for(lambda: len(function_double.calls) == 2, 20, 0.05, "two receives")
        await sqs.drained(url)
        (dead,) = await sqs.receive_n(dlq, 1)
        assert dead["Body"] == "always 503"
        attributes = attributes_of(dead)
        assert attributes[DLT_QUEUE_URL] == url
        assert attributes["fastconn-dlt-message-id"] == sent
        assert attributes["fastconn-dlt-reason"] == "max_deliver (2) reached"
        assert attributes["fastconn-dlt-function"] == "flaky"
        assert attributes["fastconn-dlt-status"] == "503"
        assert attributes["fastconn-dlt-deliveries"] == "2"
        assert attributes["tenant"] == "acme"  # the message's own attributes are kept
        context = json.loads(attributes[DLT_CONTEXT])
        assert context["fastconn-dlt-error"] == "HTTP 503"
        assert context["fastconn-dlt-response"] == "always 503"  # the double echoes the body


async def test_non_retryable_failure_is_dead_lettered_at_once(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    url, dlq = await sqs.queue("work"), await sqs.queue("dlq")
    function_double.script("/fn", [400])
    source = sqs_source(sqs, [url], dead_letter_queue_url=dlq, max_deliver=5)
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [source])
    async with DaemonProcess(config, tmp_path):
        await sqs.send(url, "bad request")
        (dead,) = await sqs.receive_n(dlq, 1)
        await sqs.drained(url)
        assert attributes_of(dead)["fastconn-dlt-reason"] == "non-retryable failure"
        assert len(function_double.calls) == 1


async def test_fifo_groups_keep_their_order(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """Two groups of 15: each group's messages reach the function in the order sent, the very
    first call failing once (retried in place: nothing of its group overtakes it), and the two
    groups running side by side."""
    url = await sqs.queue("orders", fifo=True)
    function_double.script("/fn", [503, 200], delay=0.05)
    source = sqs_source(sqs, [url], retry_delay="1s")
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [source])
    # Sent before the daemon starts, so the first receives see both groups' backlog.
    for i in range(15):
        for group in ("a", "b"):
            await sqs.send(url, f"{group}-{i}", MessageGroupId=group)
    async with DaemonProcess(config, tmp_path):
        await wait_for(
            lambda: len([c for c in function_double.calls if c.status == 200]) == 30, 60, 0.1, "30 calls"
        )
        await sqs.drained(url)
    order: dict[str, list[int]] = defaultdict(list)
    for call in function_double.calls:
        if call.status == 200:
            group, _, n = call.body.decode().partition("-")
            order[group].append(int(n))
    assert order == {"a": list(range(15)), "b": list(range(15))}
    (failed,) = [c.body for c in function_double.calls if c.status == 503]
    assert failed in (b"a-0", b"b-0")
    a_calls = [c.at for c in function_double.calls if c.body.startswith(b"a-")]
    b_calls = [c.at for c in function_double.calls if c.body.startswith(b"b-")]
    assert min(b_calls) < max(a_calls) and min(a_calls) < max(b_calls)  # interleaved in time


async def test_two_replicas_share_a_queue(sqs: Sqs, function_double: FunctionDouble, tmp_path: Path) -> None:
    url = await sqs.queue()
    function_double.script("/fn", [200], delay=0.01)
    # Short visibility: a delete moto loses to a concurrent one (see Sqs.drained) comes back soon.
    source = sqs_source(sqs, [url], visibility_timeout="5s")
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [source])
    n = 600
    async with DaemonProcess(config, tmp_path) as one, DaemonProcess(config, tmp_path) as two:
        await sqs.send_many(url, [f"m{i}" for i in range(n)])
        await wait_for(lambda: len({c.body for c in function_double.calls}) == n, 60, 0.1, f"{n} messages")
        await sqs.drained(url)
        by_replica = [
            (await daemon.metrics()).get('fastconn_messages_acked_total{source="sqs"}', 0)
            for daemon in (one, two)
        ]
    assert {c.body for c in function_double.calls} == {f"m{i}".encode() for i in range(n)}
    assert sum(by_replica) >= n
    assert all(count > 0 for count in by_replica), by_replica  # both took a share


async def test_a_stalled_function_stops_receives(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """With 4 calls in flight that do not answer, the source holds at most 10 messages (twice the
    in-flight bound, at least one receive's worth) and receives nothing more: the backlog stays
    visible in SQS for other replicas."""
    url = await sqs.queue()
    function_double.script("/fn", [200], delay=8.0)
    config = daemon_config(
        function_double,
        {"fn": [url.rpartition("/")[2]]},
        [sqs_source(sqs, [url])],
        max_inflight=4,
        batch_size=8,
        function_timeout="60s",
        shutdown_timeout="1s",
    )
    await sqs.send_many(url, [f"m{i}" for i in range(200)])
    async with DaemonProcess(config, tmp_path) as daemon:
        await wait_for(lambda: len(function_double.calls) == 4, 15, 0.05, "four stalled calls")
        for _ in range(10):  # over 2s: the receive count does not grow past the room
            visible, in_flight = await sqs.counts(url)
            assert in_flight <= 10, in_flight
            assert visible >= 200 - 10, visible  # moto counts the two at slightly different times
            await asyncio.sleep(0.2)
        assert len(function_double.calls) == 4
        metrics = await daemon.metrics()
        assert (
            metrics.get(
                'fastconn_messages_received_total{source="sqs",topic="' + url.rpartition("/")[2] + '"}', 0
            )
            <= 16
        )


async def test_s3_uploads_reach_the_function_one_message_per_record(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """moto's S3 notifies the queue in the AWS format (plus its s3:TestEvent); with
    decode = "s3" each upload is a call on s3/<bucket>/ObjectCreated/Put, the key decoded."""
    url = await sqs.queue("uploads")
    bucket = "img.fastconn-test"
    await sqs.s3.create_bucket(Bucket=bucket)
    await sqs.s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": await sqs.arn(url), "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    source = sqs_source(sqs, [url], decode="s3")
    config = daemon_config(function_double, {"images": [f"s3/{bucket}/ObjectCreated/#"]}, [source])
    keys = ["a.jpg", "with space/b c.png", "plus+sign.txt"]
    async with DaemonProcess(config, tmp_path):
        for key in keys:
            await sqs.s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 7)
        await wait_for(lambda: len(function_double.calls) == 3, 20, 0.05, "three calls")
        await sqs.drained(url)
    calls = function_double.calls
    assert sorted(c.headers["X-S3-Key"] for c in calls) == sorted(keys)
    for call in calls:
        assert call.headers["X-Topic"] == f"s3/{bucket}/ObjectCreated/Put"
        assert call.headers["X-S3-Bucket"] == bucket
        assert call.headers["X-S3-Event"] == "ObjectCreated:Put"
        assert call.headers["X-S3-Size"] == "7"
        assert call.headers["X-Message-Id"].startswith("s3-")
        assert json.loads(call.body)["s3"]["bucket"]["name"] == bucket
    assert len({c.headers["X-Message-Id"] for c in calls}) == 3


async def test_s3_notification_with_several_records_settles_once_all_are(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """One SQS message of two records, one record's function failing once: the message stays
    until both records succeeded; an undecodable message goes to the dead-letter queue with
    the reason."""
    url, dlq = await sqs.queue("events"), await sqs.queue("dlq")
    function_double.script("/deletes", [503, 200])
    source = sqs_source(sqs, [url], decode="s3", dead_letter_queue_url=dlq)
    config = daemon_config(
        function_double, {"creates": ["s3/+/ObjectCreated/#"], "deletes": ["s3/+/ObjectRemoved/#"]}, [source]
    )
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "sequencer": "1"}},
    }
    removed = {**record, "eventName": "ObjectRemoved:Delete"}
    async with DaemonProcess(config, tmp_path):
        await sqs.send(url, json.dumps({"Records": [record, removed]}))
        await sqs.send(url, "not an S3 event")
        (dead,) = await sqs.receive_n(dlq, 1)
        assert dead["Body"] == "not an S3 event"
        assert attributes_of(dead)["fastconn-dlt-reason"].startswith("cannot decode: not JSON")
        await wait_for(lambda: len(function_double.calls_to("/deletes")) == 2, 20, 0.05, "the retry")
        await sqs.drained(url)
    counts = Counter(c.path for c in function_double.calls)
    assert counts == {"/creates": 2, "/deletes": 2}  # the whole message came back: a duplicate


async def test_a_missing_queue_fails_the_start_naming_it(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    missing = f"{sqs.endpoint_url}/123456789012/no-such-queue"
    config = daemon_config(function_double, {"fn": ["x"]}, [sqs_source(sqs, [missing])])
    daemon = DaemonProcess(config, tmp_path)
    with pytest.raises(RuntimeError) as caught:
        await daemon.start(timeout=30)
    assert f"cannot use queue {missing}" in str(caught.value)
    assert "Traceback" not in daemon.output()


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_kill_9_mid_stream_then_restart_loses_nothing(
    sqs: Sqs, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """4,000 messages streamed into the queue; the daemon is killed (SIGKILL) a third of the way
    through and started again: every message reaches the function. What the killed daemon held
    comes back after its visibility timeout (5s here): duplicates, counted, never losses. moto
    is the slow part (30-150 messages/s on a loaded machine, and every idle long poll spins a
    moto thread): four pollers, and a count small enough to finish in minutes there."""
    url = await sqs.queue()
    n = 4_000
    source = sqs_source(sqs, [url], visibility_timeout="5s", pollers=4)
    config = daemon_config(function_double, {"fn": [url.rpartition("/")[2]]}, [source])
    bodies = [f"m{i}" for i in range(n)]
    producer = asyncio.create_task(sqs.stream(url, bodies, lambda: len(function_double.calls)))
    try:
        daemon = DaemonProcess(config, tmp_path)
        await daemon.start()
        started = time.monotonic()
        try:
            await wait_for(lambda: len(function_double.calls) >= n // 3, 400, 0.01, "a third delivered")
        finally:
            daemon.kill()
        before = len(function_double.calls)
        print(f"{before} calls in {time.monotonic() - started:.1f}s, then kill -9")
        async with DaemonProcess(config, tmp_path):
            unique = lambda: len({c.body for c in function_double.calls})  # noqa: E731
            await wait_for(lambda: unique() >= n, 600, 0.2, lambda: f"every message ({unique()} of {n})")
            await producer
            await sqs.drained(url, timeout=60)
    finally:
        producer.cancel()
    seen = Counter(c.body for c in function_double.calls_to("/fn"))
    missing = {body.encode() for body in bodies} - set(seen)
    duplicates = sum(count - 1 for count in seen.values())
    print(
        f"kill -9 after {before} calls: lost {len(missing)}, duplicates {duplicates}", Counter(seen.values())
    )
    assert not missing
    assert before < n
