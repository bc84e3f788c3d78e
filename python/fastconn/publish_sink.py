"""Broker destinations fastconn publishes to itself, shared by every feature that does: dead
letters (:mod:`fastconn.dead_letter_sink`) and CloudEvents reply events (``reply_sink``).

* ``nats``: a core NATS ``subject``; "published" once the server confirmed it has the message
  (a flush round trip: core NATS has no per-message acknowledgement).
* ``jetstream``: a JetStream ``subject`` a stream captures; the publish acknowledgement is
  awaited.
* ``kafka``: a record on a Kafka ``topic`` with ``acks = all``.

:meth:`Publisher.publish` returns only once the destination holds the message and raises
:class:`PublishError` otherwise; :meth:`Publisher.open` raises :class:`SourceError` naming the
configuration key (``key``) to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fastconn.errors import SourceError
from fastconn.sources._nats_common import NatsConnectionConfig, connect, connection_health

__all__ = [
    "JetStreamPublishConfig",
    "KafkaPublishConfig",
    "NatsPublishConfig",
    "PublishConfig",
    "PublishError",
    "Publisher",
    "destination",
    "publisher",
]

log = logging.getLogger("fastconn.publish")

PUBLISH_TIMEOUT = 10.0
"""Seconds a publish may wait for its acknowledgement."""


class PublishError(Exception):
    """The destination did not take the message."""


class NatsPublishConfig(NatsConnectionConfig):
    """``{ type = "nats", servers = [...], subject = "..." }``."""

    type: Literal["nats"]
    subject: str = Field(min_length=1, pattern=r"^[^\s*>]+$")
    """A concrete subject (no wildcards)."""


class JetStreamPublishConfig(NatsConnectionConfig):
    """``{ type = "jetstream", servers = [...], subject = "..." }``."""

    type: Literal["jetstream"]
    subject: str = Field(min_length=1, pattern=r"^[^\s*>]+$")
    """A concrete subject a stream captures (no wildcards)."""


class KafkaPublishConfig(BaseModel):
    """``{ type = "kafka", bootstrap_servers = "...", topic = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kafka"]
    bootstrap_servers: str = Field(min_length=1)
    topic: str = Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")


PublishConfig = Annotated[
    NatsPublishConfig | JetStreamPublishConfig | KafkaPublishConfig, Field(discriminator="type")
]
"""Any destination, told apart by ``type``."""


def destination(config: NatsPublishConfig | JetStreamPublishConfig | KafkaPublishConfig) -> str:
    """Where ``config`` publishes, for log lines."""
    if isinstance(config, KafkaPublishConfig):
        return f"Kafka topic {config.topic}"
    return f"{config.type} subject {config.subject}"


class Publisher(Protocol):
    async def open(self) -> None:
        """Connects; raises :class:`SourceError` naming what is wrong and the fix."""
        ...

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        """Returns once the destination holds the message; raises :class:`PublishError`."""
        ...

    async def close(self) -> None: ...


def publisher(
    config: NatsPublishConfig | JetStreamPublishConfig | KafkaPublishConfig, name: str, key: str
) -> Publisher:
    """The publisher for ``config``: ``name`` names its connection, ``key`` is its config key
    (``dead_letter``, ``reply_sink``) in error messages."""
    if isinstance(config, KafkaPublishConfig):
        return KafkaPublisher(config, name, key)
    return NatsPublisher(config, name, key)


class NatsPublisher:
    """Core NATS (flush after each batch) or JetStream (publish acknowledgement)."""

    def __init__(self, config: NatsPublishConfig | JetStreamPublishConfig, name: str, key: str) -> None:
        self.config = config
        self.name = name
        self.key = key
        self._client: Any = None
        self._js: Any = None

    async def open(self) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("%s: NATS error: %r", self.name, exc)

        health = connection_health(self.config, self.name, log)
        self._client = await connect(self.config, name=self.name, log=log, error_cb=on_error, health=health)
        if self.config.type == "jetstream":
            self._js = self._client.jetstream()

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        from nats.errors import Error as NatsError

        subject = self.config.subject
        try:
            if self._js is not None:
                await self._js.publish(subject, payload, headers=dict(headers), timeout=PUBLISH_TIMEOUT)
            else:
                await self._client.publish(subject, payload, headers=dict(headers))
                await self._client.flush(timeout=PUBLISH_TIMEOUT)
        except (NatsError, TimeoutError) as exc:
            raise PublishError(f"{self.key} subject {subject!r}: {exc!r}") from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class KafkaPublisher:
    def __init__(self, config: KafkaPublishConfig, name: str, key: str) -> None:
        self.config = config
        self.name = name
        self.key = key
        self._producer: Any = None

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap_servers, acks="all", client_id=f"fastconn-{self.name}"
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise SourceError(
                f"{self.key} Kafka at {self.config.bootstrap_servers!r}: {exc!r} "
                f"(check {self.key}.bootstrap_servers)"
            ) from None
        self._producer = producer

    async def publish(self, payload: bytes, headers: Sequence[tuple[str, str]]) -> None:
        from aiokafka.errors import KafkaError

        try:
            await self._producer.send_and_wait(
                self.config.topic, payload, headers=[(k, v.encode()) for k, v in headers]
            )
        except KafkaError as exc:
            raise PublishError(f"{self.key} topic {self.config.topic!r}: {exc!r}") from exc

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
