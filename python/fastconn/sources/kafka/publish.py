"""What the Kafka source publishes: dead letters (made smaller when the broker refuses them as
too large) and function responses, each retried until written or the message is no longer
this source's to finish."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, Literal

from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from fastconn.backoff import doubling
from fastconn.deadletter import (
    DLT_HEADERS_DROPPED,
    DLT_PREFIX,
    DLT_RESPONSE,
    failure_context,
    response_excerpt,
)
from fastconn.message import Outcome
from fastconn.responses import response_messages
from fastconn.sources.kafka.config import KafkaConfig
from fastconn.sources.kafka.settle import smaller_dead_letter
from fastconn.sources.kafka.state import Record

__all__ = ["DLT_OFFSET", "DLT_PARTITION", "DLT_TOPIC", "Publisher", "dead_letter_headers"]

log = logging.getLogger("fastconn.source.kafka")

# The source's own coordinates on dead letters (the rest of the context is fastconn.deadletter's).
DLT_TOPIC: Final = "fastconn-dlt-original-topic"
DLT_PARTITION: Final = "fastconn-dlt-original-partition"
DLT_OFFSET: Final = "fastconn-dlt-original-offset"


class Publisher:
    """Publishes for one Kafka source with its producer."""

    def __init__(
        self,
        producer: Any,
        config: KafkaConfig,
        counters: dict[str, int],
        *,
        on_error: Callable[[str], None],
        on_stuck: Callable[[Record], None],
        gone: Callable[[Record], bool],
    ) -> None:
        """``counters``: the source's (``dead_letters_shrunk``, ``responses``); ``on_error``
        counts a publish error; ``on_stuck`` marks a message stuck; ``gone`` says whether a
        message is no longer this source's (revoked partition, closing source)."""
        self._producer = producer
        self.config = config
        self.counters = counters
        self._on_error = on_error
        self._on_stuck = on_stuck
        self._gone = gone

    async def responses(self, rec: Record, outcome: Outcome) -> bool:
        """Publishes every function's response to ``response_topic`` (keyed like the input);
        False when the message is gone meanwhile."""
        topic = self.config.response_topic
        assert topic is not None
        part = rec.partition
        where = [
            ("X-Kafka-Topic", part.tp.topic.encode()),
            ("X-Kafka-Partition", str(part.tp.partition).encode()),
            ("X-Kafka-Offset", str(rec.offset).encode()),
        ]
        for body, fields in response_messages(outcome):
            headers = [(k, v.encode()) for k, v in fields.items()] + where
            if not await self.send(rec, topic, body, headers, what="response", too_large="skip"):
                return False
        return True

    async def dead_letter(self, rec: Record, outcome: Outcome) -> bool:
        """Publishes the dead letter of ``rec``; when the broker refuses it as too large, a
        smaller form (:func:`.settle.smaller_dead_letter`: payload cut, then headers left out), so
        the message can be done and its partition's commit move on. When nothing smaller is
        left, retries that (the limit may be raised) with the message counted as stuck."""
        topic = self.config.dead_letter_topic
        assert topic is not None
        value, headers = outcome.message.payload, dead_letter_headers(rec, outcome)
        form = (value, headers)
        refusals = 0
        while True:
            sent = await self.send(rec, topic, *form, what="dead letter", too_large="report")
            if sent is not None:
                return sent
            refusals += 1
            smaller = smaller_dead_letter(value, headers, refusals)
            if smaller is None:
                break
            size = len(form[0]) + sum(len(k) + len(v) for k, v in form[1])
            form = smaller
            if refusals == 1:
                self.counters["dead_letters_shrunk"] += 1
            cut = f"payload cut to {len(form[0])} of {len(value)} bytes" if len(form[0]) < len(value) else ""
            bare = (
                "the message's own headers left out"
                if any(k == DLT_HEADERS_DROPPED for k, _ in form[1])
                else ""
            )
            log.warning(
                "kafka: the dead letter of %s (%d bytes with headers) is too large for %s; "
                "sending it smaller: %s",
                rec.message.message_id,
                size,
                topic,
                ", ".join(filter(None, (cut, bare))),
            )
        self._on_stuck(rec)
        log.error(
            "kafka: the dead letter of %s is too large for %s even cut to %d payload bytes and "
            "fastconn's context headers: the message stays undone (fastconn_kafka_stuck_messages), "
            "holding its partition's commit; retrying in case the topic's limit is raised",
            rec.message.message_id,
            topic,
            len(form[0]),
        )
        return bool(await self.send(rec, topic, *form, what="dead letter", too_large="retry"))

    async def send(
        self,
        rec: Record,
        topic: str,
        value: bytes,
        headers: list[tuple[str, bytes]],
        *,
        what: str,
        too_large: Literal["skip", "report", "retry"],
    ) -> bool | None:
        """Publishes until it succeeds (True), or the partition is revoked / the source closes
        (False: the message stays undone and is read again). A record the broker (or the
        producer's ``max_request_size``) refuses as too large is left out with an error log
        (``skip``, returns True), reported to the caller (``report``, returns None), or retried
        like any failure (``retry``)."""
        attempt = 0
        while True:
            attempt += 1
            delay = doubling(attempt, self.config.retry_backoff_initial, self.config.retry_backoff_max)
            try:
                await self._producer.send_and_wait(topic, value, key=rec.key, headers=headers)
                if what == "response":
                    self.counters["responses"] += 1
                return True
            except MessageSizeTooLargeError as exc:
                self._on_error("publish")
                if too_large == "report":
                    return None
                if too_large == "skip":
                    log.error(
                        "kafka: %s for %s too large for %s, not published: %s",
                        what,
                        rec.message.message_id,
                        topic,
                        exc,
                    )
                    return True
                log.log(
                    logging.ERROR if attempt == 1 else logging.DEBUG,
                    "kafka: %s for %s too large for %s (%s); retrying in %.1fs",
                    what,
                    rec.message.message_id,
                    topic,
                    exc,
                    delay,
                )
            except KafkaError as exc:
                self._on_error("publish")
                log.warning(
                    "kafka: publishing the %s of %s to %s failed (%s); retrying in %.1fs",
                    what,
                    rec.message.message_id,
                    topic,
                    exc,
                    delay,
                )
            if self._gone(rec):
                return False
            await asyncio.sleep(delay)
            if self._gone(rec):
                return False


def dead_letter_headers(rec: Record, outcome: Outcome) -> list[tuple[str, bytes]]:
    """The record's headers plus the failure context (:mod:`fastconn.deadletter`)."""
    part = rec.partition
    origin = [
        (DLT_TOPIC, part.tp.topic),
        (DLT_PARTITION, str(part.tp.partition)),
        (DLT_OFFSET, str(rec.offset)),
    ]
    reason = "non-retryable failure"
    context = failure_context(outcome, origin, deliveries=rec.deliveries, reason=reason)
    headers = [(k, v) for k, v in rec.headers if not k.startswith(DLT_PREFIX)]
    headers += [(k, v.encode()) for k, v in context]
    excerpt = response_excerpt(outcome)
    if excerpt is not None:
        headers.append((DLT_RESPONSE, excerpt))
    return headers
