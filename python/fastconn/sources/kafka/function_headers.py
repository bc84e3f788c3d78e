"""The HTTP headers a function gets for one Kafka record (``X-Kafka-*``)."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Final

from fastconn.headers import passthrough
from fastconn.ingress_store import KAFKA_MESSAGE_ID_HEADER, TOPIC_HEADER, unwrap

__all__ = ["add_key_headers", "function_headers", "headers_of_record", "stored_event"]

# A stored event's envelope (fastconn.ingress_store) is fastconn's, not the sender's; nor are
# the source's own X-Kafka-* coordinates.
_STORED_RESERVED: Final = frozenset(
    {
        TOPIC_HEADER.lower(),
        KAFKA_MESSAGE_ID_HEADER.lower(),
        "x-kafka-topic",
        "x-kafka-partition",
        "x-kafka-offset",
    }
)

_TOKEN = re.compile(r"[^!#$%&'*+.^_`|~0-9A-Za-z-]")
_RESERVED = frozenset({"topic", "partition", "offset", "key", "key-enc"})


def _as_header_text(value: bytes) -> str | None:
    """The value as an HTTP header value when it is printable ASCII, else None (send base64)."""
    if not value.isascii():
        return None
    text = value.decode("ascii")
    return text if text.isprintable() else None


def add_key_headers(headers: list[tuple[str, str]], key: bytes) -> None:
    text = _as_header_text(key)
    if text is None:
        headers.append(("X-Kafka-Key", base64.b64encode(key).decode()))
        headers.append(("X-Kafka-Key-Enc", "b64"))
    else:
        headers.append(("X-Kafka-Key", text))


def headers_of_record(record_headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, str]]:
    """A record's own headers as ``X-Kafka-<name>``; names reduced to HTTP token characters."""
    headers: list[tuple[str, str]] = []
    for name, raw in record_headers:
        token = _TOKEN.sub("-", name).strip("-")
        lowered = token.lower()
        if not token or lowered in _RESERVED or lowered.endswith("-enc"):
            continue  # unrepresentable, or would spoof fastconn's own headers
        value = raw or b""
        text = _as_header_text(value)
        if text is None:
            headers.append((f"X-Kafka-{token}", base64.b64encode(value).decode()))
            headers.append((f"X-Kafka-{token}-Enc", "b64"))
        else:
            headers.append((f"X-Kafka-{token}", text))
    return headers


def function_headers(
    topic: str,
    partition: int,
    offset: int,
    *,
    key: bytes | None,
    record_headers: Sequence[tuple[str, bytes | None]] = (),
) -> list[tuple[str, str]]:
    """The ``X-Kafka-*`` headers of one record (``X-Topic`` and ``X-Message-Id`` come from the
    core). Values that are not printable ASCII go as base64 with a ``-Enc: b64`` companion."""
    headers = headers_of_record(record_headers) if record_headers else []
    headers.append(("X-Kafka-Topic", topic))
    headers.append(("X-Kafka-Partition", str(partition)))
    headers.append(("X-Kafka-Offset", str(offset)))
    if key is not None:
        add_key_headers(headers, key)
    return headers


def stored_event(
    record_headers: Sequence[tuple[str, bytes | None]] | None,
) -> tuple[str, str, list[tuple[str, str]]] | None:
    """(topic, message id, request headers) of a record a webhook's Kafka store wrote, or None
    when the record is not such an envelope. The request's headers come back under their own
    names (as the webhook forwarded them), through fastconn's one header policy."""
    if not record_headers:
        return None
    text = {name: (raw or b"").decode("utf-8", "surrogateescape") for name, raw in record_headers}
    stored = unwrap(text, KAFKA_MESSAGE_ID_HEADER)
    if stored is None:
        return None
    topic, message_id = stored
    return topic, message_id, passthrough(text.items(), source_reserved=_STORED_RESERVED)
