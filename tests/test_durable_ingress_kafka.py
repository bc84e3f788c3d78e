"""Durable HTTP ingress into Kafka: a webhook with ``store = { type = "kafka" }`` answers 202 only
once the brokers acknowledged the event (acks=all), and a Kafka source with ``stored_events``
dispatches it by its original topic with the id the 202 carried. Real daemons, a real
Kafka-protocol broker (Tansu), real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from durable_ingress_flood import kill_9_during_a_flood, message_ids
from fastconn.config import validate_config
from fastconn.errors import ConfigError
from fastconn.testing import FunctionDouble, free_port, wait_for
from kafka_fixtures import Broker, kafka_broker  # noqa: F401

if TYPE_CHECKING:
    from conftest import DaemonFactory


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _config(fn: FunctionDouble, broker: Broker, topic: str, group: str, **store: Any) -> dict[str, Any]:
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s"},
        "functions": [
            {"name": "orders", "url": fn.url("/orders"), "topics": ["orders"]},
            {"name": "audit", "url": fn.url("/audit"), "topics": ["audit log"]},
        ],
        "sources": [
            {
                "type": "webhook",
                "store": {
                    "type": "kafka",
                    "brokers": [broker.bootstrap],
                    "topic": topic,
                    "partitions": 2,
                    "publish_timeout": "2s",
                    **store,
                },
            },
            {
                "type": "kafka",
                "brokers": [broker.bootstrap],
                "topics": [topic],
                "group_id": group,
                "stored_events": True,
                "session_timeout": 3,
                "heartbeat_interval": 0.5,
                "commit_interval": 0.2,
                "retry_backoff_initial": 0.05,
                "retry_backoff_max": 0.2,
                "revoke_timeout": 3,
            },
        ],
    }


async def test_stored_events_reach_their_functions_by_their_topic_with_the_id_of_their_202(
    kafka_broker: Broker,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    topic = _name("ingress")
    daemon = await daemon_factory(_config(function_double, kafka_broker, topic, _name("g")))
    accepted: dict[str, str] = {}
    for i, target in enumerate(["orders", "audit log", "orders", "nobody"]):
        async with http.post(
            f"{daemon.url}/webhook/{target}", data=f"event {i}".encode(), headers={"X-Shop": "7"}
        ) as r:
            assert r.status == 202, await r.text()
            accepted[r.headers["X-Message-Id"]] = target
    # The broker holds all four, each with its envelope, before any function was called.
    records = await kafka_broker.read(topic, 4)
    assert sorted(r.value for r in records) == [f"event {i}".encode() for i in range(4)]
    for record in records:
        envelope = dict(record.headers)
        topic_of = {b"orders": "orders", b"audit%20log": "audit log", b"nobody": "nobody"}
        assert accepted[envelope["Fastconn-Message-Id"].decode()] == topic_of[envelope["Fastconn-Topic"]]
        assert record.key == envelope["Fastconn-Message-Id"]
    await wait_for(lambda: len(function_double.calls) == 3, 20, what="the three routed events")
    assert sorted(message_ids(function_double, "/orders")) == sorted(
        i for i, t in accepted.items() if t == "orders"
    )
    (audit,) = function_double.calls_to("/audit")
    assert accepted[audit.headers["X-Message-Id"]] == "audit log"
    assert audit.body == b"event 1"
    assert audit.headers["X-Shop"] == "7", "the request's headers come back under their own names"
    assert audit.headers["X-Topic"] == "audit log"
    assert "Fastconn-Topic" not in audit.headers and "Fastconn-Message-Id" not in audit.headers
    async with http.post(f"{daemon.url}/webhook/orders?wait=true", data=b"x") as r:
        assert r.status == 400, "no ?wait on a stored webhook"


async def test_a_burst_is_stored_in_one_go_and_every_event_arrives(
    kafka_broker: Broker,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    topic = _name("burst")
    daemon = await daemon_factory(_config(function_double, kafka_broker, topic, _name("g")))

    async def post(i: int) -> str:
        async with http.post(f"{daemon.url}/webhook/orders", data=f"b{i}".encode()) as r:
            assert r.status == 202, await r.text()
            return r.headers["X-Message-Id"]

    ids = await asyncio.gather(*(post(i) for i in range(200)))
    await wait_for(lambda: len(function_double.calls_to("/orders")) >= 200, 30, what="200 deliveries")
    assert set(message_ids(function_double, "/orders")) == set(ids)


def test_the_store_and_the_stored_events_source_check_their_keys() -> None:
    functions = [{"name": "f", "url": "http://f", "topics": ["t"]}]
    with pytest.raises(ConfigError) as excinfo:
        validate_config(
            {
                "functions": functions,
                "sources": [
                    {"type": "webhook", "store": {"type": "kafka", "brokers": ["k:9092"], "topic": "a b"}}
                ],
            }
        )
    [problem] = excinfo.value.problems
    assert "store" in problem.location and "must be a Kafka topic name" in problem.message, problem
    with pytest.raises(ConfigError) as excinfo:
        validate_config(
            {
                "functions": functions,
                "sources": [{"type": "kafka", "brokers": ["k:9092"], "stored_events": True}],
            }
        )
    [problem] = excinfo.value.problems
    assert "set topics = [<the store's topic>]" in problem.message, problem
    good = validate_config(
        {
            "functions": functions,
            "sources": [
                {
                    "type": "webhook",
                    "store": {"type": "kafka", "brokers": "k1:9092,k2:9092", "topic": "ingress"},
                }
            ],
        }
    )
    assert good.sources[0].store.brokers == ("k1:9092", "k2:9092"), "the Kafka source's broker keys"


@pytest.mark.slow
async def test_kill_9_during_a_flood_loses_no_event_that_got_a_202(
    kafka_broker: Broker,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    config = _config(function_double, kafka_broker, _name("flood"), _name("g"))
    # Slower than the flood: most accepted events are only in the topic when the daemon dies.
    function_double.script("/orders", delay=0.5)
    flood = await kill_9_during_a_flood(
        "kafka", config, function_double, daemon_factory, http, delivery_timeout=90
    )
    # Calls take 0.5 s: the kill caught accepted events that had not reached the function yet;
    # the restarted replica delivering them proves they came from the topic. (Duplicates need a
    # call that finished before the kill and was not committed: commits follow calls closely, so
    # there may be none.)
    assert flood.accepted - flood.seen_before, "the kill must catch accepted events not delivered yet"


async def test_a_missing_store_topic_or_unreachable_brokers_are_clear_start_errors(
    kafka_broker: Broker,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
) -> None:
    missing = _config(function_double, kafka_broker, _name("absent"), _name("g"), create_topic=False)
    missing["sources"] = missing["sources"][:1]  # the webhook alone: its store fails first
    daemon = await daemon_factory(missing, wait=None)
    code = await asyncio.wait_for(asyncio.to_thread(daemon.process.wait), 60)  # type: ignore[union-attr]
    assert code != 0
    assert "does not exist: create it, or set store.create_topic = true" in daemon.output(), daemon.output()
    assert "Traceback" not in daemon.output()

    unreachable = _config(
        function_double, kafka_broker, _name("t"), _name("g"), brokers=[f"127.0.0.1:{free_port()}"]
    )
    unreachable["sources"] = unreachable["sources"][:1]
    daemon = await daemon_factory(unreachable, wait=None)
    code = await asyncio.wait_for(asyncio.to_thread(daemon.process.wait), 60)  # type: ignore[union-attr]
    assert code != 0
    assert "cannot reach the Kafka brokers" in daemon.output(), daemon.output()
    assert "Traceback" not in daemon.output()
