"""Key order across a crash: ``ordering = "key"``, a function failing 30 % of its calls at
random, and a ``kill -9`` of the daemon mid-stream. After the restart no message may first
succeed after a later message of its own key, and none may be lost.

Each source has its own way back: a Kafka group restarts at the committed offset (everything
past it is read again, in order); a JetStream durable redelivers what was in flight only when
its ``ack_wait`` runs out, so the restarted source holds new messages until then.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from conftest import DaemonFactory
from fastconn.testing import FunctionDouble, RecordedCall, wait_for
from kafka_fixtures import Broker, kafka_broker
from nats_fixtures import NatsServer, connected, daemon_config, nats_server, unique

__all__ = ["kafka_broker", "nats_server"]  # fixtures, used by name

P = TypeVar("P", bound=Hashable)

KEYS = 20
MESSAGES = 2000
FAILURE_RATIO = 0.3


def first_successes(calls: Sequence[RecordedCall], position: Callable[[RecordedCall], P]) -> list[P]:
    """Each message's position, in the order of its first 2xx answer."""
    seen: set[P] = set()
    order: list[P] = []
    for call in calls:
        where = position(call)
        if call.status is not None and 200 <= call.status < 300 and where not in seen:
            seen.add(where)
            order.append(where)
    return order


def late_messages(order: Sequence[tuple[Hashable, int]]) -> int:
    """How many messages first succeeded after a later message of their key: ``order`` holds
    (key, position in the key's log) in first-success order."""
    newest: dict[Hashable, int] = {}
    late = 0
    for key, pos in order:
        if pos < newest.get(key, -1):
            late += 1
        newest[key] = max(pos, newest.get(key, -1))
    return late


def test_late_messages_counts_each_message_that_came_after_a_later_one() -> None:
    assert late_messages([("a", 1), ("b", 1), ("a", 2), ("b", 2)]) == 0
    assert late_messages([("a", 2), ("a", 1), ("b", 1), ("a", 3), ("a", 0)]) == 2


@dataclass
class Crash:
    delivered_at_kill: int
    seconds_to_deliver_the_rest: float


async def kill_mid_stream_and_restart(
    daemon_factory: DaemonFactory,
    config: Mapping[str, Any],
    delivered: Callable[[], int],
    after_kill: Callable[[], Awaitable[None]] | None = None,
) -> Crash:
    """Runs a daemon until a quarter of the messages are delivered, kills it (SIGKILL), starts
    another and waits until every message is delivered."""
    first = await daemon_factory(config)
    await wait_for(lambda: delivered() >= MESSAGES // 4, 20, 0.01, "a quarter of the messages delivered")
    first.kill()
    at_kill = delivered()
    if after_kill is not None:
        await after_kill()
    started = time.monotonic()
    await daemon_factory(config)
    await wait_for(lambda: delivered() == MESSAGES, 30, 0.05, "every message delivered after the restart")
    return Crash(at_kill, time.monotonic() - started)


@pytest.mark.parametrize(
    "dispatch",
    [
        # The dead daemon had max_ack_pending (1000) out: nothing new until some are acked.
        pytest.param({}, id="window-full"),
        # It had its dispatcher's 128 out: the server serves new messages at once after the restart.
        pytest.param({"max_inflight": 64, "batch_size": 64}, id="window-partial"),
    ],
)
async def test_jetstream_key_order_survives_kill_9(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    dispatch: dict[str, int],
) -> None:
    stream, base = unique("ORDER"), unique("order")
    function_double.script("/fn", [200], delay=0.002)
    function_double.flaky("/fn", FAILURE_RATIO, seed=7)
    source = {
        "type": "jetstream",
        "servers": [nats_server.url],
        "stream": stream,
        "subjects": [f"{base}.>"],
        "ordering": "key",  # the key is the subject: one per KEYS
        "ack_wait": "2s",
        "max_deliver": -1,
        "nak_delay": "20ms",
        "nak_delay_max": "100ms",
    }
    config = daemon_config(function_double, {"fn": [f"{base}.*"]}, [source], max_attempts=2, **dispatch)
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{base}.>"])
        for i in range(MESSAGES):
            await nc.publish(f"{base}.k{i % KEYS}", str(i).encode())
        await nc.flush()

        async def stored() -> bool:
            return bool((await js.stream_info(stream)).state.messages == MESSAGES)

        await wait_for(stored, 10, 0.05, "every message stored")

        def seq(call: RecordedCall) -> int:
            return int(call.headers["X-Nats-Sequence"])

        pending = 0

        async def count_unacked() -> None:
            nonlocal pending
            pending = (await js.consumer_info(stream, "fastconn")).num_ack_pending

        crash = await kill_mid_stream_and_restart(
            daemon_factory, config, lambda: len(first_successes(function_double.calls, seq)), count_unacked
        )

        async def all_acked() -> bool:
            info = await js.consumer_info(stream, "fastconn")
            return bool(info.ack_floor.stream_seq == MESSAGES and info.num_ack_pending == 0)

        await wait_for(all_acked, 10, 0.05, "every message acknowledged")
    successes = first_successes(function_double.calls, seq)
    # Stream sequence i + 1 holds message i, published on key i % KEYS.
    late = late_messages([((s - 1) % KEYS, s) for s in successes])
    print(
        f"\njetstream kill -9 after {crash.delivered_at_kill}/{MESSAGES} delivered ({pending} unacked): "
        f"the rest delivered {crash.seconds_to_deliver_the_rest:.1f}s after the restart; {late} late"
    )
    assert sorted(successes) == list(range(1, MESSAGES + 1)), "none lost"
    assert late == 0, f"{late} message(s) first succeeded after a later message of their key"


async def test_kafka_key_order_survives_kill_9(kafka_broker: Broker, daemon_factory: DaemonFactory) -> None:
    topic = await kafka_broker.create_topic(unique("order"), 4)
    group = unique("g")
    async with FunctionDouble() as function:
        function.script("/fn", [200], delay=0.002)
        function.flaky("/fn", FAILURE_RATIO, seed=7)
        config = {
            "functions": [{"name": "fn", "url": function.url("/fn"), "topics": [topic]}],
            "dispatch": {
                "max_attempts": 2,
                "backoff_initial": 0.01,
                "backoff_max": 0.05,
                "shutdown_timeout": 5,
            },
            "sources": [
                {
                    "type": "kafka",
                    "brokers": [kafka_broker.bootstrap],
                    "topics": [topic],
                    "group_id": group,
                    "ordering": "key",
                    "session_timeout": 3,
                    "heartbeat_interval": 0.5,
                    "commit_interval": 0.2,
                    "retry_backoff_initial": 0.02,
                    "retry_backoff_max": 0.1,
                }
            ],
            "log_level": "info",
        }
        sent = await kafka_broker.produce(
            topic,
            [{"value": str(i).encode(), "key": f"k{i % KEYS}".encode()} for i in range(MESSAGES)],
            pipelined=True,
        )
        key_of = {(p, o): i % KEYS for i, (p, o) in enumerate(sent)}

        def where(call: RecordedCall) -> tuple[int, int]:
            return int(call.headers["X-Kafka-Partition"]), int(call.headers["X-Kafka-Offset"])

        crash = await kill_mid_stream_and_restart(
            daemon_factory, config, lambda: len(first_successes(function.calls, where))
        )
        successes = first_successes(function.calls, where)
    # Within a key (which lives in one partition) the log order is the offset order.
    late = late_messages([(key_of[w], w[1]) for w in successes])
    print(
        f"\nkafka kill -9 after {crash.delivered_at_kill}/{MESSAGES} delivered: the rest delivered "
        f"{crash.seconds_to_deliver_the_rest:.1f}s after the restart; {late} late"
    )
    assert set(successes) == set(key_of), "none lost"
    assert late == 0, f"{late} message(s) first succeeded after a later message of their key"
