"""Durable HTTP ingress: events accepted over HTTP are stored in a JetStream stream (or a Kafka
topic) before the sender gets its 202, and dispatched from there by a JetStream (or Kafka)
source.

Without a store, a webhook's 202 means "accepted for dispatch": a crash before the functions
answered loses the event, and the sender, told 202, does not send it again. With
``store = { type = "jetstream", ... }`` on the route, the 202 is sent only once the stream has
acknowledged the event (the publish ack: it is on disk, replicated as the stream says); a
``type = "jetstream"`` source with ``stored_events = true`` on that stream then dispatches it
with the at-least-once machinery every JetStream message gets (ack after success, redelivery,
dead letters). Replicas behind a load balancer share one stream.

The envelope: the stream message's payload is the request body; its headers are the
forwarded request headers plus

* ``Fastconn-Topic``: the topic, percent-encoded (a topic is any printable text, a NATS header
  value is not);
* ``Nats-Msg-Id``: the message id the 202 carried in ``X-Message-Id``. JetStream drops a second
  publish with the same id inside the stream's duplicate window, so the publish retried here after
  a lost acknowledgement is stored once, and the function later sees the very id the sender got.

With ``store = { type = "kafka", brokers = [...], topic = "..." }`` the same envelope goes to a
Kafka topic (:mod:`fastconn.sources.kafka.ingress_store`): the record's value is the body, its
key the message id, its headers the forwarded request headers plus ``Fastconn-Topic`` and
``Fastconn-Message-Id``; the 202 waits for ``acks=all``; a ``type = "kafka"`` source with
``stored_events = true`` on that topic dispatches it (commit after success).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Protocol
from urllib.parse import quote, unquote

from pydantic import Field, field_validator

from fastconn.durations import Duration
from fastconn.errors import SourceError
from fastconn.health import ConnectionHealth
from fastconn.sources._kafka_connection import KafkaConnectionConfig, is_topic_name
from fastconn.sources._nats_common import NatsConnectionConfig, connect, connection_health

__all__ = [
    "KAFKA_MESSAGE_ID_HEADER",
    "MESSAGE_ID_HEADER",
    "TOPIC_HEADER",
    "IngressStore",
    "IngressStoreConfig",
    "JetStreamStore",
    "JetStreamStoreConfig",
    "KafkaStoreConfig",
    "StoreUnavailable",
    "StoredEvent",
    "open_store",
    "unwrap",
]

log = logging.getLogger("fastconn.ingress_store")

TOPIC_HEADER: Final = "Fastconn-Topic"
MESSAGE_ID_HEADER: Final = "Nats-Msg-Id"
KAFKA_MESSAGE_ID_HEADER: Final = "Fastconn-Message-Id"
"""Kafka has no broker-side duplicate window keyed by a header: the id travels as a header."""


class StoreUnavailable(Exception):
    """The stream did not acknowledge the event: the sender must be told to retry (503)."""


class JetStreamStoreConfig(NatsConnectionConfig):
    """``store = { type = "jetstream", servers = [...], stream = "...", subject = "..." }``."""

    type: Literal["jetstream"]
    stream: str = Field(min_length=1, pattern=r"^[^\s.*>/\\]+$")
    subject: str = Field(min_length=1)
    """The concrete subject events are published to (the stream must capture it)."""
    create_stream: bool = True
    """Create ``stream`` capturing ``subject`` when it does not exist (file storage)."""
    publish_timeout: Duration = Field(default=5.0, gt=0)
    """How long one publish waits for the stream's acknowledgement (then once more, same id)."""

    @field_validator("subject")
    @classmethod
    def _concrete(cls, value: str) -> str:
        tokens = value.split(".")
        if any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens):
            raise ValueError(
                f"store.subject {value!r} must be a concrete NATS subject (dot-separated tokens, "
                "no wildcards or spaces), e.g. fastconn.ingress"
            )
        return value


class KafkaStoreConfig(KafkaConnectionConfig):
    """``store = { type = "kafka", brokers = [...], topic = "..." }`` (plus the Kafka source's
    connection keys: ``security_protocol``, SASL, TLS)."""

    type: Literal["kafka"]
    topic: str = Field(min_length=1)
    """The topic events are written to (a ``type = "kafka"`` source with ``stored_events``
    reads it)."""
    create_topic: bool = True
    """Create ``topic`` with ``partitions`` partitions when it does not exist."""
    partitions: int = Field(default=1, ge=1, le=10_000)
    publish_timeout: Duration = Field(default=5.0, gt=0)
    """How long a burst waits for the brokers' acknowledgement (acks=all) before the senders get
    503 (they retry: an event can then be stored twice, never lost once it got its 202)."""

    @field_validator("topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not is_topic_name(value):
            raise ValueError(
                f"store.topic {value!r} must be a Kafka topic name: 1-249 letters, digits, '.', '_' "
                "or '-', e.g. fastconn-ingress"
            )
        return value


IngressStoreConfig = Annotated[JetStreamStoreConfig | KafkaStoreConfig, Field(discriminator="type")]
"""A webhook's ``store``: a JetStream stream or a Kafka topic, told apart by ``type``."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    topic: str
    body: bytes
    headers: Sequence[tuple[str, str]]
    message_id: str


def unwrap(headers: dict[str, str] | None, id_header: str = MESSAGE_ID_HEADER) -> tuple[str, str] | None:
    """(topic, message id) of a stored event's headers (NATS; Kafka's with ``id_header`` =
    :data:`KAFKA_MESSAGE_ID_HEADER`), or None when they are not an ingress envelope."""
    if not headers:
        return None
    topic = headers.get(TOPIC_HEADER)
    message_id = headers.get(id_header)
    if topic is None or not message_id:
        return None
    return unquote(topic), message_id


class IngressStore(Protocol):
    """Where a webhook stores what it accepts (one per source)."""

    health: ConnectionHealth | None

    async def open(self) -> None:
        """Connects (and creates the stream or topic when allowed); a :class:`SourceError`
        naming the problem when it cannot."""

    async def put(self, events: Sequence[StoredEvent]) -> None:
        """Stores every event of a burst, or raises :class:`StoreUnavailable`."""

    async def close(self) -> None: ...


def open_store(config: JetStreamStoreConfig | KafkaStoreConfig, name: str) -> IngressStore:
    """The store ``config`` describes, for the webhook source ``name`` (not connected yet)."""
    if isinstance(config, KafkaStoreConfig):
        # Imported here: aiokafka's producer is loaded only by configurations that use it.
        from fastconn.sources.kafka.ingress_store import KafkaStore

        return KafkaStore(config, name)
    return JetStreamStore(config, name)


class JetStreamStore:
    """Publishes accepted events to the stream and waits for the acknowledgements."""

    def __init__(self, config: JetStreamStoreConfig, name: str) -> None:
        self.config = config
        self.name = f"{name}-store"
        self.health: ConnectionHealth | None = None
        self._client: Any = None
        self._js: Any = None

    async def open(self) -> None:
        from nats.js.errors import NotFoundError

        self.health = connection_health(self.config, self.name, log)

        async def on_error(exc: Exception) -> None:
            log.warning("%s: NATS error: %r", self.name, exc)

        self._client = await connect(
            self.config, name=self.name, log=log, error_cb=on_error, health=self.health
        )
        self._js = self._client.jetstream()
        try:
            info = await self._js.stream_info(self.config.stream)
        except NotFoundError:
            if not self.config.create_stream:
                await self.close()
                raise SourceError(
                    f"store stream {self.config.stream!r} does not exist: create it (capturing "
                    f"{self.config.subject!r}) or set store.create_stream = true"
                ) from None
            await self._js.add_stream(name=self.config.stream, subjects=[self.config.subject])
            return
        subjects = info.config.subjects or []
        if not any(_captures(s, self.config.subject) for s in subjects):
            await self.close()
            raise SourceError(
                f"store stream {self.config.stream!r} does not capture {self.config.subject!r} "
                f"(its subjects: {', '.join(subjects) or 'none'}): add the subject to the stream"
            )

    async def put(self, events: Sequence[StoredEvent]) -> None:
        """Stores every event (concurrently: one round trip for the lot) or raises
        :class:`StoreUnavailable`. After that an event may be stored or not (its ack may have
        been lost): the sender retries, so a refused event can arrive twice, never zero times
        once it got its 202."""
        results = await asyncio.gather(*(self._put_one(e) for e in events), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise StoreUnavailable(f"{len(failed)} of {len(events)} event(s) not stored: {failed[0]!r}")

    async def _put_one(self, event: StoredEvent) -> None:
        from nats.errors import Error as NatsError

        if not self._client.is_connected:
            # nats-py would buffer the publish until it reconnects and the ack wait would time
            # out meanwhile: refuse at once instead, so the sender retries elsewhere or later.
            raise StoreUnavailable("not connected to the store's NATS servers")
        headers = dict(event.headers)
        headers[TOPIC_HEADER] = quote(event.topic, safe="")
        headers[MESSAGE_ID_HEADER] = event.message_id
        for attempt in (1, 2):
            try:
                await self._js.publish(
                    self.config.subject, event.body, headers=headers, timeout=self.config.publish_timeout
                )
                return
            except (NatsError, TimeoutError) as exc:
                # The same Nats-Msg-Id again: stored once even if the first one got through.
                if attempt == 2:
                    raise StoreUnavailable(repr(exc)) from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _captures(pattern: str, subject: str) -> bool:
    """Whether the NATS subject ``pattern`` (with ``*``/``>``) matches ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
