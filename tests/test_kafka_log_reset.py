"""The Kafka source after the log under it went away: the broker lost its data (a memory-backed
broker restarted, or a topic deleted and created again) so the partition's offsets start again
from 0 below the source's position. The consumer's position is out of range; it must reset
(``auto_offset_reset``), forget the old offsets and deliver the new records, not stall."""

from __future__ import annotations

import uuid

import pytest

from fastconn import testing
from fastconn.functions import FunctionTarget
from fastconn.testing import free_port, wait_for
from kafka_fixtures import Broker, KafkaFunction, running_source


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
async def test_a_broker_that_lost_its_log_is_followed_from_the_new_start(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    workdir = tmp_path_factory.mktemp("tansu")
    server = testing.ServerProcess("tansu", testing.tansu_command(port), port, workdir / "tansu.log")
    broker = Broker(f"127.0.0.1:{port}", server.process, workdir / "tansu.log")
    topic, group = _name("reset"), _name("g")
    try:
        await broker.create_topic(topic, 1)
        async with KafkaFunction() as fn:
            config = {
                "type": "kafka",
                "brokers": [broker.bootstrap],
                "topics": [topic],
                "group_id": group,
                "session_timeout": 3,
                "heartbeat_interval": 0.5,
                "commit_interval": 0.2,
                "retry_backoff_initial": 0.05,
                "retry_backoff_max": 0.2,
                "revoke_timeout": 3,
                "initial_offset": "earliest",
            }
            async with running_source(config, [FunctionTarget("fn", (topic,), fn.url("/fn"))]):
                await broker.produce(topic, [{"value": f"a{i}".encode()} for i in range(50)], pipelined=True)
                await wait_for(lambda: len(fn.finished) == 50, 20, what="the first 50 delivered")
                server.stop()
                server = testing.ServerProcess(
                    "tansu", testing.tansu_command(port), port, workdir / "tansu.log"
                )
                # The source's metadata requests may have created it again already.
                await broker.create_topic(topic, 1, exist_ok=True)
                await broker.produce(topic, [{"value": f"b{i}".encode()} for i in range(10)], pipelined=True)
                second = {f"b{i}".encode() for i in range(10)}
                await wait_for(
                    lambda: second <= {body for body, _, _ in fn.finished},
                    30,
                    0.1,
                    "the records written after the broker lost its log",
                )
    finally:
        server.stop()
