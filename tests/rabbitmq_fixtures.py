"""Fixtures for the RabbitMQ tests: the machine's broker (``RABBITMQ_URL``, default
``amqp://guest:guest@127.0.0.1:5672/``), shared with other users, so every test works on
queues and exchanges of its own (:class:`Names`) and deletes them afterwards, retry queues
included. Broker state is read with ``rabbitmqctl`` (unacknowledged counts, connections).

An unreachable broker is a failure, not a skip (set-up installs and starts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from fastconn.testing import FunctionDouble, wait_for

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Names:
    """Queue and exchange names unique to one test, deleted at its end."""

    prefix: str = field(default_factory=lambda: f"fc-test-{uuid.uuid4().hex[:8]}")
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    def queue(self, label: str = "q") -> str:
        name = f"{self.prefix}.{label}"
        self.queues.append(name)
        return name

    def exchange(self, label: str = "x") -> str:
        name = f"{self.prefix}.{label}"
        self.exchanges.append(name)
        return name


@dataclass
class Broker:
    """A connection to the broker for a test: publish, read, count."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    names: Names

    async def publish(self, routing_key: str, body: bytes, *, exchange: str = "", **properties: Any) -> None:
        target = (
            self.channel.default_exchange
            if not exchange
            else await self.channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(aio_pika.Message(body, **properties), routing_key)

    async def publish_many(self, queue: str, bodies: Sequence[bytes], **properties: Any) -> None:
        """Many messages, confirmed in windows (one confirm round trip per window)."""
        window = 500
        for start in range(0, len(bodies), window):
            await asyncio.gather(
                *(self.publish(queue, body, **properties) for body in bodies[start : start + window])
            )

    async def declare(self, queue: str, **arguments: Any) -> None:
        await self.channel.declare_queue(queue, durable=True, arguments=arguments or None)

    async def get_all(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Takes (and acknowledges) every message now ready in ``queue``."""
        q = await self.channel.declare_queue(queue, passive=True)
        out = []
        while (msg := await q.get(no_ack=True, fail=False)) is not None:
            out.append(msg)
        return out


async def rabbitmqctl(*args: str) -> str:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl not found (scripts/setup.sh installs rabbitmq-server)", pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        binary, "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()}")
    return out.decode()


async def queue_counts(prefix: str) -> dict[str, tuple[int, int]]:
    """``name -> (ready, unacknowledged)`` for the queues whose names start with ``prefix``."""
    out = await rabbitmqctl(
        "list_queues", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"
    )
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(prefix):
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


async def ready_count(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue`` (cheap: a passive declaration)."""
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def drained(channel: AbstractChannel, queue: str, timeout: float = 20.0) -> None:
    """Waits until ``queue`` (and its retry queues) hold nothing, ready or unacknowledged.
    Polls the cheap ready count first: every ``rabbitmqctl`` call starts an Erlang VM."""
    await wait_for(lambda: _ready_is(channel, queue, 0), timeout, 0.05, f"{queue} has nothing ready")

    async def empty() -> bool:
        counts = await queue_counts(queue)
        return bool(counts) and all(ready == 0 and unacked == 0 for ready, unacked in counts.values())

    await wait_for(empty, timeout, 0.5, f"{queue} drained")


async def _ready_is(channel: AbstractChannel, queue: str, n: int) -> bool:
    return await ready_count(channel, queue) == n


async def close_connections(name: str) -> int:
    """Closes the broker connections whose client-given name contains ``name`` (the daemon's
    source name): a connection loss for that daemon only."""
    out = await rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    closed = 0
    for line in out.splitlines():
        if name in line:
            pid = line.split()[0]
            await rabbitmqctl("close_connection", pid, "test: connection closed on purpose")
            closed += 1
    return closed


@contextlib.asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    names = Names()
    try:
        connection = await aio_pika.connect_robust(URL, timeout=5)
    except Exception as exc:
        pytest.fail(f"RabbitMQ not reachable at {URL}: {exc!r}", pytrace=False)
    channel = await connection.channel()
    try:
        yield Broker(connection, channel, names)
    finally:
        await _delete(channel, names)
        await connection.close()


async def _delete(channel: AbstractChannel, names: Names) -> None:
    leftovers = await queue_counts(names.prefix)
    for queue in {*names.queues, *leftovers}:
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
    for exchange in names.exchanges:
        with contextlib.suppress(Exception):
            await channel.exchange_delete(exchange)


@pytest.fixture
async def rabbit() -> AsyncIterator[Broker]:
    async with broker() as b:
        yield b


def rabbit_source(name: str, queues: Sequence[Any], **options: Any) -> dict[str, Any]:
    return {
        "type": "rabbitmq",
        "name": name,
        "url": URL,
        "queues": list(queues),
        "retry_delay": "200ms",
        "backoff_max": "1s",
        **options,
    }


def daemon_config(
    double: FunctionDouble,
    functions: Mapping[str, Sequence[str]],
    sources: Sequence[Mapping[str, Any]],
    **dispatch: Any,
) -> dict[str, Any]:
    """A daemon config with static functions ``name -> topics`` served by ``double`` at
    ``/<name>``, fast retries, and the given sources."""
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s", **dispatch},
        "functions": [
            {"name": name, "url": double.url(f"/{name}"), "topics": list(topics)}
            for name, topics in functions.items()
        ],
        "sources": list(sources),
    }
