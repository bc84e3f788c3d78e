"""What a function receives of an SQS message: the queue's coordinates (the OpenFaaS SQS
connector's ``X-SQS-Message-ID`` and ``X-SQS-Queue-URL``) and the message attributes as
``X-Sqs-Attr-<name>`` (through the shared header policy)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

from fastconn.headers import passthrough
from fastconn.s3_events import SOURCE_RESERVED as S3_RESERVED

__all__ = ["ATTR_PREFIX", "MESSAGE_ID", "QUEUE_URL", "SOURCE_RESERVED", "attribute_headers", "attribute_text"]

MESSAGE_ID: Final = "X-SQS-Message-ID"
QUEUE_URL: Final = "X-SQS-Queue-URL"
ATTR_PREFIX: Final = "X-Sqs-Attr-"
SOURCE_RESERVED: Final = frozenset({MESSAGE_ID.lower(), QUEUE_URL.lower(), *S3_RESERVED})
"""Names only the source sets: an attribute must not spoof them."""


def attribute_text(value: Mapping[str, Any]) -> str | None:
    """One message attribute's value as text: String and Number as sent, Binary as base64;
    list values (reserved by SQS, never sent) are left out."""
    if "StringValue" in value and isinstance(value["StringValue"], str):
        return value["StringValue"]
    binary = value.get("BinaryValue")
    if isinstance(binary, bytes | bytearray):
        return base64.b64encode(binary).decode("ascii")
    return None


def attribute_headers(attributes: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The message attributes as ``X-Sqs-Attr-<name>`` headers."""
    if not attributes:
        return []
    prefixed = []
    for name, value in attributes.items():
        text = attribute_text(value) if isinstance(value, Mapping) else None
        if text is not None:
            prefixed.append((f"{ATTR_PREFIX}{name}", text))
    return passthrough(prefixed, source_reserved=SOURCE_RESERVED)
