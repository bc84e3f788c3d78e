"""Bounded under hostile input: metric series keyed by outside input are capped; replies to
core NATS requests slow intake instead of queueing without bound."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Outcome
from fastconn.metrics import Metrics
from fastconn.source import MAX_TOPIC_LABELS, OTHER_TOPICS, UNROUTED_TOPIC, SourceContext
from fastconn.sources import nats as nats_source
from fastconn.testing import FunctionDouble, wait_for
from nats_fixtures import NatsServer, connected, nats_server, unique  # noqa: F401 (fixture)

if TYPE_CHECKING:
    from conftest import DaemonFactory


def _received_series(samples: dict[str, float]) -> dict[str, float]:
    prefix = "fastconn_messages_received_total{"
    return {k: v for k, v in samples.items() if k.startswith(prefix)}


async def test_unrouted_webhook_topics_share_one_metric_series(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    config = {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t", "w.*"]}],
        "sources": [{"type": "webhook"}],
    }
    daemon = await daemon_factory(config)
    for i in range(50):
        async with http.post(f"{daemon.url}/webhook/random-{i}", data=b"x") as r:
            assert r.status == 202
    for topic in ("t", "t", "w.1"):
        async with http.post(f"{daemon.url}/webhook/{topic}", data=b"x") as r:
            assert r.status == 202
    series = _received_series(await daemon.metrics())
    assert series == {
        f'fastconn_messages_received_total{{source="webhook",topic="{UNROUTED_TOPIC}"}}': 50.0,
        'fastconn_messages_received_total{source="webhook",topic="t"}': 2.0,
        'fastconn_messages_received_total{source="webhook",topic="w.1"}': 1.0,
    }


async def test_routed_topic_labels_are_capped(function_double: FunctionDouble) -> None:
    metrics = Metrics()

    async def ready(_: float) -> bool:
        return True

    async with Dispatcher(DispatchOptions(max_inflight=64)) as dispatcher:
        dispatcher.set_functions([FunctionTarget("f", ("w.>",), function_double.url("/f"))])
        ctx = SourceContext(dispatcher=dispatcher, metrics=metrics, app=web.Application(), wait_ready=ready)
        outcomes: list[Outcome] = []
        extra = 7
        messages = [Message(f"w.{i}", b"") for i in range(MAX_TOPIC_LABELS + extra)]
        await ctx.submit("src", messages, outcomes.extend)
        await ctx.submit("src", [Message("w.0", b""), Message("nobody", b"")], outcomes.extend)
        await wait_for(lambda: len(outcomes) == len(messages) + 2, 30, what="every outcome")
    samples = {
        s.labels["topic"]: s.value
        for family in metrics.messages_received.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(samples) == MAX_TOPIC_LABELS + 2
    assert samples[OTHER_TOPICS] == extra
    assert samples[UNROUTED_TOPIC] == 1
    assert samples["w.0"] == 2


async def test_queued_nats_replies_slow_intake_instead_of_growing(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = 20
    monkeypatch.setattr(nats_source, "MAX_QUEUED_REPLIES", bound)
    subject, inbox = unique("rpc"), unique("inbox")
    requests = 200
    options = DispatchOptions(max_inflight=4, batch_size=4, max_attempts=1)
    async with Dispatcher(options) as dispatcher, connected(nats_server.url) as nc:

        async def ready(_timeout: float) -> bool:
            return True

        dispatcher.set_functions([FunctionTarget("echo", (subject,), function_double.url("/echo"))])
        ctx = SourceContext(dispatcher=dispatcher, metrics=Metrics(), app=web.Application(), wait_ready=ready)
        source = nats_source.create(nats_source.NatsConfig(servers=(nats_server.url,), subjects=(subject,)))
        source.register(ctx)
        await source.start()
        # The NATS connection stops taking replies (a slow or disconnected server) until opened.
        gate = asyncio.Event()
        publish = source._nc.publish

        async def gated_publish(subject: str, *args: Any, **kwargs: Any) -> None:
            if subject.startswith(inbox):
                await gate.wait()
            await publish(subject, *args, **kwargs)

        source._nc.publish = gated_publish
        answers: list[bytes] = []

        async def on_answer(msg: Any) -> None:
            answers.append(msg.data)

        await nc.subscribe(f"{inbox}.*", cb=on_answer)
        try:
            for i in range(requests):
                await nc.publish(subject, b"%d" % i, reply=f"{inbox}.{i}")
            await nc.flush()
            # Intake stops: nothing left in the dispatcher, messages held back in the source.
            await wait_for(
                lambda: dispatcher.queued == 0 and len(source._replies) >= bound and source._buffer,
                20,
                what="intake to stop behind the queued replies",
            )
            calls = len(function_double.calls_to("/echo"))
            assert calls < requests / 2, f"{calls} messages dispatched although replies could not go out"
            # What the dispatcher held, and one batch waiting for room in it, when intake stopped.
            assert len(source._replies) <= bound + dispatcher.capacity + options.batch_size
            gate.set()
            await wait_for(lambda: len(answers) == requests, 20, what="every reply once the gate opened")
        finally:
            await source.stop()
            await dispatcher.close()
            await source.close()
