"""Dead-letter destinations for sources whose broker has none of its own (vCenter, Pushbullet,
any poller): ``dead_letter = { type = ... }`` in the source's table.

* ``file``: JSON lines appended to a local file and fsynced: ``{"headers": [[name, value], ...],
  "payload": "<utf-8 text>"}`` (or ``"payload_base64"`` when the payload is not UTF-8).
* ``jetstream``: a message published to a JetStream ``subject`` (the stream must capture it),
  the failure context as NATS headers; the publish acknowledgement is awaited.
* ``kafka``: a record on a Kafka ``topic`` with the context as record headers, ``acks = all``.

The headers are :func:`fastconn.deadletter.failure_context` plus the source's own
``fastconn-dlt-original-*`` coordinates, the same on every destination. :meth:`publish` returns
only once the destination holds the letter and raises :class:`DeadLetterError` otherwise: the
caller then keeps the message (retries later) rather than losing it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fastconn.errors import SourceError
from fastconn.sources._nats_common import NatsConnectionConfig, connect, connection_health

__all__ = [
    "DeadLetterConfig",
    "DeadLetterError",
    "DeadLetterSink",
    "FileDeadLetterConfig",
    "JetStreamDeadLetterConfig",
    "KafkaDeadLetterConfig",
    "dead_letter_sink",
]

log = logging.getLogger("fastconn.dead_letter")


class DeadLetterError(Exception):
    """The destination did not take the letter (the message must be kept)."""


class FileDeadLetterConfig(BaseModel):
    """``dead_letter = { type = "file", path = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"] = "file"
    path: str


class JetStreamDeadLetterConfig(NatsConnectionConfig):
    """``dead_letter = { type = "jetstream", servers = [...], subject = "..." }``."""

    type: Literal["jetstream"]
    subject: str = Field(min_length=1, pattern=r"^[^\s*>]+$")
    """A concrete subject a stream captures (no wildcards)."""


class KafkaDeadLetterConfig(BaseModel):
    """``dead_letter = { type = "kafka", bootstrap_servers = "...", topic = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kafka"]
    bootstrap_servers: str = Field(min_length=1)
    topic: str = Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")


DeadLetterConfig = Annotated[
    FileDeadLetterConfig | JetStreamDeadLetterConfig | KafkaDeadLetterConfig, Field(discriminator="type")
]


class DeadLetterSink(Protocol):
    async def open(self) -> None:
        """Connects; raises :class:`SourceError` naming what is wrong and the fix."""
        ...

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        """Stores one letter durably; raises :class:`DeadLetterError` when it could not."""
        ...

    async def close(self) -> None: ...


def dead_letter_sink(config: DeadLetterConfig, source: str) -> DeadLetterSink:
    if isinstance(config, FileDeadLetterConfig):
        return FileDeadLetters(Path(config.path))
    if isinstance(config, JetStreamDeadLetterConfig):
        return JetStreamDeadLetters(config, source)
    return KafkaDeadLetters(config, source)


class FileDeadLetters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(self.path.touch, exist_ok=True)
        except OSError as exc:
            raise SourceError(
                f"dead-letter file {str(self.path)!r} cannot be created ({exc.strerror}): "
                "set dead_letter.path to a writable file"
            ) from None

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        letter: dict[str, Any] = {"headers": [list(h) for h in headers]}
        try:
            letter["payload"] = payload.decode()
        except UnicodeDecodeError:
            letter["payload_base64"] = base64.b64encode(payload).decode()
        line = json.dumps(letter, ensure_ascii=False) + "\n"
        async with self._lock:  # whole lines, in order
            try:
                await asyncio.to_thread(self._append, line.encode())
            except OSError as exc:
                raise DeadLetterError(f"dead-letter file {str(self.path)!r}: {exc}") from exc

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def close(self) -> None:
        return None


class JetStreamDeadLetters:
    def __init__(self, config: JetStreamDeadLetterConfig, source: str) -> None:
        self.config = config
        self.name = f"{source}-dead-letters"
        self._client: Any = None
        self._js: Any = None

    async def open(self) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("%s: NATS error: %r", self.name, exc)

        health = connection_health(self.config, self.name, log)
        self._client = await connect(self.config, name=self.name, log=log, error_cb=on_error, health=health)
        self._js = self._client.jetstream()

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        from nats.errors import Error as NatsError

        try:
            await self._js.publish(self.config.subject, payload, headers=dict(headers), timeout=10.0)
        except (NatsError, TimeoutError) as exc:
            raise DeadLetterError(f"dead-letter subject {self.config.subject!r}: {exc!r}") from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class KafkaDeadLetters:
    def __init__(self, config: KafkaDeadLetterConfig, source: str) -> None:
        self.config = config
        self.source = source
        self._producer: Any = None

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap_servers,
            acks="all",
            client_id=f"fastconn-{self.source}-dead-letters",
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise SourceError(
                f"dead-letter Kafka at {self.config.bootstrap_servers!r}: {exc!r} "
                "(check dead_letter.bootstrap_servers)"
            ) from None
        self._producer = producer

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        from aiokafka.errors import KafkaError

        try:
            await self._producer.send_and_wait(
                self.config.topic, payload, headers=[(k, v.encode()) for k, v in headers]
            )
        except KafkaError as exc:
            raise DeadLetterError(f"dead-letter topic {self.config.topic!r}: {exc!r}") from exc

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
