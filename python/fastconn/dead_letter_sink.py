"""Dead-letter destinations for sources whose broker has none of its own (vCenter, Pushbullet,
any poller): ``dead_letter = { type = ... }`` in the source's table.

* ``file``: JSON lines appended to a local file and fsynced: ``{"headers": [[name, value], ...],
  "payload": "<utf-8 text>"}`` (or ``"payload_base64"`` when the payload is not UTF-8).
* ``jetstream``: a message published to a JetStream ``subject`` (the stream must capture it),
  the failure context as NATS headers; the publish acknowledgement is awaited.
* ``kafka``: a record on a Kafka ``topic`` with the context as record headers, ``acks = all``.

The two brokers are :mod:`fastconn.publish_sink`'s publishers (shared with CloudEvents
``reply_sink``).

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fastconn.errors import SourceError
from fastconn.publish_sink import (
    JetStreamPublishConfig,
    KafkaPublishConfig,
    Publisher,
    PublishError,
    publisher,
)

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


DeadLetterError = PublishError
"""The destination did not take the letter (the message must be kept)."""


class FileDeadLetterConfig(BaseModel):
    """``dead_letter = { type = "file", path = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"] = "file"
    path: str


JetStreamDeadLetterConfig = JetStreamPublishConfig
"""``dead_letter = { type = "jetstream", servers = [...], subject = "..." }``."""

KafkaDeadLetterConfig = KafkaPublishConfig
"""``dead_letter = { type = "kafka", bootstrap_servers = "...", topic = "..." }``."""


DeadLetterConfig = Annotated[
    FileDeadLetterConfig | JetStreamDeadLetterConfig | KafkaDeadLetterConfig, Field(discriminator="type")
]


DeadLetterSink = Publisher
"""Stores one letter durably (``publish``), raising :class:`DeadLetterError` when it could not."""


def dead_letter_sink(config: DeadLetterConfig, source: str) -> DeadLetterSink:
    if isinstance(config, FileDeadLetterConfig):
        return FileDeadLetters(Path(config.path))
    # The broker destinations are fastconn's publish sinks, shared with CloudEvents replies.
    return publisher(config, f"{source}-dead-letters", "dead_letter")


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
