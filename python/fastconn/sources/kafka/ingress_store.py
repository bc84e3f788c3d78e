"""Durable ingress into a Kafka topic (``store = { type = "kafka", ... }`` on a webhook): the
events of a burst are produced together (the producer batches them per partition) and the 202
is sent only once the brokers acknowledged every one with ``acks=all``. The envelope is
described in :mod:`fastconn.ingress_store`; a ``type = "kafka"`` source with
``stored_events = true`` reads it back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from fastconn.errors import SourceError
from fastconn.health import ConnectionHealth
from fastconn.ingress_store import (
    KAFKA_MESSAGE_ID_HEADER,
    TOPIC_HEADER,
    KafkaStoreConfig,
    StoredEvent,
    StoreUnavailable,
)
from fastconn.sources._kafka_health import MetadataProbe
from fastconn.sources.kafka.config import client_options

__all__ = ["KafkaStore"]

log = logging.getLogger("fastconn.ingress_store")

# Large enough for any webhook body (max_body_bytes tops out far below) plus its headers.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class KafkaStore:
    """Produces accepted events to the store topic and waits for the acknowledgements."""

    def __init__(self, config: KafkaStoreConfig, name: str) -> None:
        self.config = config
        self.name = f"{name}-store"
        # The brokers' reachability in /readyz, probed like the Kafka source's (no events
        # come from aiokafka): a webhook whose store is down would only answer 503.
        self._reachable = ConnectionHealth(self.name, ", ".join(config.brokers), log)
        self.health: ConnectionHealth | None = self._reachable
        self._producer: Any = None
        self._probe: MetadataProbe | None = None

    async def open(self) -> None:
        options = client_options(self.config)
        try:
            if self.config.create_topic:
                await self._create_topic(options)
            producer = AIOKafkaProducer(
                **options,
                # The 202 promises the event survives the loss of the leader. No idempotence
                # (not every Kafka-protocol broker offers it): a retried batch may store an
                # event twice, which the at-least-once contract allows.
                acks="all",
                linger_ms=2,
                max_request_size=_MAX_REQUEST_BYTES,
                request_timeout_ms=int(self.config.publish_timeout * 1000),
            )
            await producer.start()
        except KafkaError as exc:
            raise SourceError(
                f"{self.name}: cannot reach the Kafka brokers {', '.join(self.config.brokers)} ({exc!r}): "
                "check store.brokers and that the brokers are up"
            ) from None
        self._producer = producer
        self._probe = MetadataProbe(self._reachable, producer.client.fetch_all_metadata)
        self._probe.start()
        if self.config.create_topic:
            return
        try:
            # All topics' metadata: asking for this one by name would let a broker that
            # creates topics on demand create it, hiding a typo.
            metadata = await producer.client.fetch_all_metadata()
            missing = not metadata.partitions_for_topic(self.config.topic)
        except KafkaError:
            missing = True
        if missing:
            await self.close()
            raise SourceError(
                f"store topic {self.config.topic!r} does not exist: create it, or set "
                "store.create_topic = true"
            )

    async def _create_topic(self, options: dict[str, Any]) -> None:
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            topic = NewTopic(self.config.topic, self.config.partitions, 1)
            response = await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            return
        finally:
            await admin.close()
        # Errors come back per topic in the answer: 36 is TOPIC_ALREADY_EXISTS.
        errors = [e for e in response.topic_errors if e[1] not in (0, 36)]
        if errors:
            raise SourceError(
                f"{self.name}: cannot create store topic {self.config.topic!r} ({errors[0]!r}): create it "
                "yourself and set store.create_topic = false, or let this client create topics"
            )

    async def put(self, events: Sequence[StoredEvent]) -> None:
        """Stores every event (produced together: one round trip per partition for the lot) or
        raises :class:`StoreUnavailable`; then some may be stored and the sender retries, so an
        event refused here can arrive twice, never zero times once it got its 202."""
        producer = self._producer
        if producer is None:
            raise StoreUnavailable("the store is not open")
        topic = self.config.topic

        async def produce() -> list[Any]:
            # send() only queues the record into the producer's batch for its partition; the
            # acknowledgements of the whole burst are then awaited together.
            acks = [
                await producer.send(topic, e.body, key=e.message_id.encode(), headers=_envelope(e))
                for e in events
            ]
            return await asyncio.gather(*acks, return_exceptions=True)

        try:
            results = await asyncio.wait_for(produce(), self.config.publish_timeout)
        except (KafkaError, TimeoutError) as exc:
            raise StoreUnavailable(repr(exc)) from exc
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise StoreUnavailable(f"{len(failed)} of {len(events)} event(s) not stored: {failed[0]!r}")

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            await probe.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


def _envelope(event: StoredEvent) -> list[tuple[str, bytes]]:
    headers = [(k, v.encode("utf-8", "surrogateescape")) for k, v in event.headers]
    headers.append((TOPIC_HEADER, quote(event.topic, safe="").encode()))
    headers.append((KAFKA_MESSAGE_ID_HEADER, event.message_id.encode()))
    return headers
