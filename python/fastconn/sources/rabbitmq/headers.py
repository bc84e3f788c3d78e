"""What a function receives of an AMQP message: the source's coordinates and the message's
own AMQP headers as ``X-Rabbitmq-<name>`` (through the shared header policy)."""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Mapping
from typing import Any, Final

from fastconn.headers import passthrough

__all__ = ["ORIGINAL_EXCHANGE", "ORIGINAL_ROUTING_KEY", "PREFIX", "SOURCE_RESERVED", "amqp_headers"]

PREFIX: Final = "X-Rabbitmq-"
ORIGINAL_EXCHANGE: Final = "x-fastconn-original-exchange"
"""Set on a message fastconn moves to a retry queue: where it was first published, since the
way back through the retry queue changes the exchange and routing key the broker reports."""
ORIGINAL_ROUTING_KEY: Final = "x-fastconn-original-routing-key"

SOURCE_RESERVED: Final = frozenset(
    {
        "x-rabbitmq-msg-id",
        "x-rabbitmq-routing-key",
        "x-rabbitmq-exchange",
        "x-rabbitmq-redelivered",
        "x-rabbitmq-queue",
        "x-rabbitmq-correlation-id",
        "x-rabbitmq-reply-to",
        "x-rabbitmq-x-death",
        f"x-rabbitmq-{ORIGINAL_EXCHANGE}",
        f"x-rabbitmq-{ORIGINAL_ROUTING_KEY}",
    }
)
"""Names only the source sets: a publisher's header ``msg-id`` must not spoof them."""


def _text(value: Any) -> str | None:
    """A scalar AMQP field value as header text; tables and arrays are left out."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, int | float | decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return None


def amqp_headers(headers: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The message's AMQP headers as ``X-Rabbitmq-<name>`` HTTP headers."""
    if not headers:
        return []
    prefixed = []
    for name, value in headers.items():
        text = _text(value)
        if text is not None:
            prefixed.append((f"{PREFIX}{name}", text))
    return passthrough(prefixed, source_reserved=SOURCE_RESERVED)
