"""The brokers scenarios start (nats-server, the Tansu Kafka broker) and the publishers that feed
them. Publishers must never be the bottleneck, so they take the cheapest path each broker
offers: raw NATS protocol lines written in large chunks, and pre-built Kafka record batches."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from _common import stamped_payload
from fastconn.testing import ServerProcess, free_port, nats_server_command, tansu_command


@contextlib.contextmanager
def watched(broker: ServerProcess, watch: dict[str, int] | None) -> Iterator[None]:
    """Registers the broker's pid under ``broker`` while it runs (windows report its CPU)."""
    if watch is not None:
        watch["broker"] = broker.pid
    try:
        yield
    finally:
        if watch is not None:
            watch.pop("broker", None)
        broker.stop()


@contextlib.contextmanager
def nats_server(workdir: Path, watch: dict[str, int] | None = None) -> Iterator[str]:
    """``nats-server -js`` on a free port; yields its URL."""
    port = free_port()
    store = workdir / "nats-store"
    store.mkdir(parents=True, exist_ok=True)
    broker = ServerProcess("nats-server", nats_server_command(port, store), port, workdir / "nats-server.log")
    with watched(broker, watch):
        yield f"nats://127.0.0.1:{port}"


@contextlib.contextmanager
def kafka_broker(workdir: Path, watch: dict[str, int] | None = None) -> Iterator[str]:
    """Tansu (memory storage) on a free port; yields the bootstrap ``host:port``."""
    port = free_port()
    broker = ServerProcess("tansu", tansu_command(port), port, workdir / "tansu.log")
    with watched(broker, watch):
        yield f"127.0.0.1:{port}"


# -- NATS ------------------------------------------------------------------------------------


class RawNatsPublisher:
    """Publishes with the NATS text protocol on a plain socket.

    nats-py costs several microseconds per ``publish``; here a chunk of PUB lines is built and
    written in one call, each payload stamped with the wall clock just before its chunk is
    written. A PING per chunk waits for the server's PONG, which comes after it has processed
    everything before it: that is the flow control (the server never has to drop us) and,
    for JetStream subjects, what makes the publish count exact.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pongs: asyncio.Queue[None] = asyncio.Queue()
        self._read_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawNatsPublisher:
        host, port = self.url.removeprefix("nats://").rsplit(":", 1)
        self._reader, self._writer = await asyncio.open_connection(host, int(port))
        await self._reader.readline()  # INFO
        self._writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\n')
        self._read_task = asyncio.create_task(self._read())
        await self.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task

    async def _read(self) -> None:
        assert self._reader is not None and self._writer is not None
        while line := await self._reader.readline():
            if line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")
            elif line.startswith(b"PONG"):
                self._pongs.put_nowait(None)
            elif line.startswith(b"-ERR"):
                raise RuntimeError(f"nats-server: {line.decode().strip()}")

    async def flush(self, timeout: float = 60.0) -> None:
        assert self._writer is not None
        self._writer.write(b"PING\r\n")
        await self._writer.drain()
        await asyncio.wait_for(self._pongs.get(), timeout)

    def _chunk(self, subject: str, count: int, size: int) -> bytes:
        head = f"PUB {subject} {size}\r\n".encode()
        return b"".join(head + stamped_payload(size) + b"\r\n" for _ in range(count))

    async def burst(self, subject: str, n: int, size: int, chunk: int = 2000) -> None:
        """``n`` messages as fast as the server takes them."""
        assert self._writer is not None
        sent = 0
        while sent < n:
            count = min(chunk, n - sent)
            self._writer.write(self._chunk(subject, count, size))
            sent += count
            await self.flush()

    async def paced(self, subject: str, n: int, size: int, rate: float) -> None:
        """``n`` messages at ``rate`` per second, in 5 ms steps (for latency at a set load)."""
        assert self._writer is not None
        started = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                self._writer.write(self._chunk(subject, due - sent, size))
                sent = due
            await asyncio.sleep(0.005)
        await self.flush()


# -- Kafka -----------------------------------------------------------------------------------


async def create_kafka_topic(bootstrap: str, name: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, partitions, 1)])
        errors = [e for e in response.topic_errors if e[1] != 0]
        if errors:
            raise RuntimeError(f"creating Kafka topic {name}: {errors}")
    finally:
        await admin.close()


async def kafka_produce(
    bootstrap: str, topic: str, n: int, size: int, partitions: int, rate: float | None = None
) -> None:
    """``n`` records spread evenly over the partitions (no key), in whole record batches (the
    per-record ``send`` of aiokafka would make the producer the bottleneck). With ``rate``,
    paced in 5 ms steps, each record stamped when its step is sent."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=1 << 20)
    await producer.start()
    try:
        started = time.perf_counter()
        sent = 0
        partition = 0
        pending: list[asyncio.Future[object]] = []
        while sent < n:
            if rate is None:
                due = min(n, sent + 1000)
            else:
                due = min(n, int((time.perf_counter() - started) * rate) + 1)
                if due <= sent:
                    await asyncio.sleep(0.005)
                    continue
            batch = producer.create_batch()
            count = 0
            while sent + count < due and batch.append(key=None, value=stamped_payload(size), timestamp=None):
                count += 1
            batch.close()
            pending.append(await producer.send_batch(batch, topic, partition=partition))
            partition = (partition + 1) % partitions
            sent += count
            if len(pending) >= 16:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
