"""Supervised background tasks: a task that dies is logged, counted and restarted; one that
keeps dying turns the daemon not ready, naming it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from fastconn.config import validate_config
from fastconn.daemon import Daemon
from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.source import SourceContext
from fastconn.sources import jetstream
from fastconn.sources._nats_common import TERM, AckWriter
from fastconn.sources.kafka.publish import Publisher
from fastconn.supervise import Supervisor
from fastconn.testing import FunctionDouble, free_port, wait_for
from kafka_fixtures import Broker, KafkaFunction, kafka_broker, running_source
from nats_fixtures import NatsServer, connected, nats_server, unique

__all__ = ["kafka_broker", "nats_server"]  # fixtures, used by name

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05}


def restarts(metrics: Metrics, task: str) -> float:
    return metrics.registry.get_sample_value("fastconn_task_restarts_total", {"task": task}) or 0.0


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, method: str, error: Exception) -> list[bool]:
    """Makes the async ``owner.method`` raise ``error`` on its first call, then work again;
    the returned list is non-empty once it raised."""
    original = getattr(owner, method)
    raised: list[bool] = []

    async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(True)
            raise error
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, patched)
    return raised


def kafka_config(broker: Broker, topic: str, group: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "brokers": [broker.bootstrap],
        "topics": [topic],
        "group_id": group,
        "commit_interval": 0.2,
        **extra,
    }


async def test_a_task_that_dies_is_logged_once_counted_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics.task_restarts, **FAST)
    runs: list[int] = []
    forever = asyncio.Event()

    async def job() -> None:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await forever.wait()

    with caplog.at_level(logging.ERROR, "fastconn.supervise"):
        task = supervisor.spawn("demo.loop", job)
        await wait_for(lambda: len(runs) == 2, 5, what="the restart")
    deaths = [r for r in caplog.records if r.exc_info and "demo.loop" in r.getMessage()]
    assert len(deaths) == 1 and str(deaths[0].exc_info[1]) == "boom"  # type: ignore[index]
    assert restarts(metrics, "demo.loop") == 1
    assert supervisor.failing == {}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "cancelling stops it for good"


async def test_a_task_that_returns_is_done_not_restarted() -> None:
    supervisor = Supervisor(None, **FAST)
    runs: list[None] = []

    async def job() -> None:
        runs.append(None)

    await supervisor.spawn("demo.once", job)
    assert runs == [None]


async def test_a_task_that_keeps_dying_is_failing_until_a_run_lasts() -> None:
    supervisor = Supervisor(None, **FAST, failing_after=3, healthy_after=0.3)
    broken = True
    forever = asyncio.Event()

    async def job() -> None:
        if broken:
            raise OSError("broker gone")
        await forever.wait()

    task = supervisor.spawn("demo.flaky", job)
    await wait_for(lambda: "demo.flaky" in supervisor.failing, 5, what="the task to be failing")
    assert supervisor.failing["demo.flaky"] == "OSError: broker gone"
    broken = False
    await wait_for(lambda: not supervisor.failing, 5, what="a lasting run to clear it")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_kafka_intake_killed_by_an_error_is_restarted_and_counted(
    kafka_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await kafka_broker.create_topic(unique("intake"), 1)
    config = kafka_config(kafka_broker, topic, unique("g"))
    # Not a KafkaError: nothing in the intake loop expects it.
    raised = fail_once(monkeypatch, AIOKafkaConsumer, "getmany", RuntimeError("client bug"))
    async with (
        KafkaFunction() as fn,
        running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h,
    ):
        await kafka_broker.produce(topic, [{"value": f"m{i}".encode()} for i in range(20)])
        await wait_for(lambda: len(fn.bodies()) >= 20, 20, what="every message after the restart")
        assert raised
        assert restarts(h.metrics, "kafka.intake") == 1


async def test_a_permanently_failing_intake_turns_the_daemon_not_ready(
    kafka_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await kafka_broker.create_topic(unique("dead"), 1)

    async def getmany_broken(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("client bug")

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany_broken)
    config = validate_config(
        {
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "functions": [{"name": "fn", "url": "http://127.0.0.1:9/fn", "topics": [topic]}],
            "sources": [kafka_config(kafka_broker, topic, unique("g"))],
        }
    )
    metrics = Metrics()
    daemon = Daemon(
        config, metrics=metrics, supervisor=Supervisor(metrics.task_restarts, **FAST, failing_after=3)
    )
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def not_ready() -> bool:
                async with http.get(f"{daemon.ingress.url}/readyz") as response:
                    return response.status == 503 and "kafka.intake" in await response.text()

            await wait_for(not_ready, 10, 0.05, "/readyz 503 naming the intake")
            async with http.get(f"{daemon.ingress.url}/readyz") as response:
                assert "RuntimeError: client bug" in await response.text()
        assert restarts(metrics, "kafka.intake") >= 3
    finally:
        await daemon.shutdown()


async def test_kafka_messages_of_a_failed_hand_off_are_still_delivered_and_committed(
    kafka_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await kafka_broker.create_topic(unique("handoff"), 1)
    group = unique("g")
    config = kafka_config(kafka_broker, topic, group)
    raised = fail_once(monkeypatch, SourceContext, "submit", RuntimeError("hand-off bug"))
    async with (
        KafkaFunction() as fn,
        running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h,
    ):
        await kafka_broker.produce(topic, [{"value": f"m{i}".encode()} for i in range(20)])

        async def all_committed() -> bool:
            return await kafka_broker.committed(group, topic, 1) == {0: 20}

        await wait_for(all_committed, 20, 0.2, "every offset committed")
        assert raised
        assert restarts(h.metrics, "kafka.intake") == 1
    assert sorted(fn.bodies()) == sorted(f"m{i}".encode() for i in range(20))


@contextlib.asynccontextmanager
async def running_jetstream(
    config: jetstream.JetStreamConfig, function: FunctionDouble
) -> AsyncIterator[Metrics]:
    """A JetStream source in process, wired as the daemon does it (every subject of the
    config routed to ``function``'s ``/fn``), with fast supervisor restarts."""
    async with Dispatcher(DispatchOptions(max_attempts=1)) as dispatcher:

        async def ready(_timeout: float) -> bool:
            return True

        metrics = Metrics()
        ctx = SourceContext(
            dispatcher=dispatcher,
            metrics=metrics,
            app=web.Application(),
            wait_ready=ready,
            supervisor=Supervisor(metrics.task_restarts, **FAST),
        )
        dispatcher.set_functions([FunctionTarget("fn", config.subjects, function.url("/fn"))])
        ctx.publish_topics(config.subjects)
        source = jetstream.create(config)
        source.register(ctx)
        await source.start()
        try:
            yield metrics
        finally:
            await source.stop()
            await dispatcher.close(5.0)
            await source.close()


async def acked(nc: Any, stream: str, n: int) -> bool:
    info = await nc.jetstream().consumer_info(stream, "fastconn")
    return bool(info.ack_floor.stream_seq == n and info.num_ack_pending == 0)


async def test_jetstream_batch_of_a_failed_hand_off_is_handed_back_at_once(
    nats_server: NatsServer, function_double: FunctionDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, subject = unique("HANDOFF"), unique("handoff")
    raised = fail_once(monkeypatch, SourceContext, "submit", RuntimeError("hand-off bug"))
    config = jetstream.JetStreamConfig(
        servers=(nats_server.url,), stream=stream, subjects=(subject,), create_stream=True, ack_wait=30.0
    )
    async with running_jetstream(config, function_double) as metrics, connected(nats_server.url) as nc:
        for i in range(20):
            await nc.publish(subject, str(i).encode())
        # Well within ack_wait (30 s): the failed batch was nak'ed, not left to expire.
        await wait_for(lambda: acked(nc, stream, 20), 10, 0.05, "every message acknowledged")
        assert raised
        assert restarts(metrics, "jetstream.submit") == 1


async def test_jetstream_dead_letter_task_that_dies_runs_again(
    nats_server: NatsServer, function_double: FunctionDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, dlq_stream = unique("DLBUG"), unique("DLBUGQ")
    subject, dlq = unique("dlbug"), unique("dlbugq")
    function_double.script("/fn", [400])
    flush = AckWriter.flush
    raised: list[bool] = []

    async def failing_once_with_term(self: AckWriter) -> None:
        # The write of the dead-lettered message's TERM fails: before supervision the
        # dead-letter task died there and the message stayed in flight, kept alive for ever.
        if not raised and any(payload == TERM for _, payload in self._queued):
            raised.append(True)
            self._queued.clear()
            raise ConnectionResetError("socket gone")
        await flush(self)

    monkeypatch.setattr(AckWriter, "flush", failing_once_with_term)
    config = jetstream.JetStreamConfig(
        servers=(nats_server.url,),
        stream=stream,
        subjects=(subject,),
        create_stream=True,
        dead_letter_subject=dlq,
    )
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=dlq_stream, subjects=[dlq])
        async with running_jetstream(config, function_double) as metrics:
            await nc.publish(subject, b"poison")
            await wait_for(lambda: acked(nc, stream, 1), 10, 0.05, "the message termed")
            assert raised
            assert restarts(metrics, "jetstream.dead-letter") == 1
        dead = await js.get_msg(dlq_stream, 1)
        assert dead.data == b"poison"
        assert (dead.headers or {})["fastconn-dlt-status"] == "400"


async def test_kafka_dead_letter_publish_that_fails_unexpectedly_runs_again(
    kafka_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await kafka_broker.create_topic(unique("publish"), 1)
    dlt, group = unique("publish-dlt"), unique("g")
    raised = fail_once(monkeypatch, Publisher, "dead_letter", RuntimeError("publish bug"))
    config = kafka_config(kafka_broker, topic, group, dead_letter_topic=dlt)
    async with (
        KafkaFunction(statuses={b"bad": [400]}) as fn,
        running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]) as h,
    ):
        await kafka_broker.produce(topic, [{"value": b"ok"}, {"value": b"bad"}, {"value": b"ok"}])

        async def all_committed() -> bool:
            return await kafka_broker.committed(group, topic, 1) == {0: 3}

        await wait_for(all_committed, 20, 0.2, "the commit past the dead letter")
        assert raised
        assert restarts(h.metrics, "kafka.publish") == 1
        assert h.sample("fastconn_kafka_dead_lettered_total", source="kafka") == 1
    (dead,) = await kafka_broker.read(dlt, 1)
    assert dead.value == b"bad"
