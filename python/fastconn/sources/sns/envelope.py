"""The JSON envelope SNS posts (Notification, SubscriptionConfirmation, UnsubscribeConfirmation),
parsed strictly, and the string its signature covers.

The signed string is ``key\\nvalue\\n`` for each present key of a fixed list, in order
(AWS "Verifying the signatures of Amazon SNS messages"): values exactly as received, never
re-encoded. ``MessageAttributes`` and ``UnsubscribeURL`` are not covered by SNS's signature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["CONFIRMATION_TYPES", "Envelope", "EnvelopeError", "parse_envelope"]

NOTIFICATION: Final = "Notification"
SUBSCRIPTION_CONFIRMATION: Final = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION: Final = "UnsubscribeConfirmation"
CONFIRMATION_TYPES: Final = frozenset({SUBSCRIPTION_CONFIRMATION, UNSUBSCRIBE_CONFIRMATION})

_SIGNED_KEYS: Final = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
    UNSUBSCRIBE_CONFIRMATION: (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_OPTIONAL: Final = frozenset({"Subject"})
_SIGNING: Final = ("SignatureVersion", "Signature", "SigningCertURL")


class EnvelopeError(ValueError):
    """The body is not an SNS envelope; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    fields: dict[str, str]
    """The signed fields present, as received."""
    signature_version: str
    signature: str
    signing_cert_url: str
    attributes: tuple[tuple[str, str, str], ...]
    """``MessageAttributes`` as (name, Type, Value), in the order received (unsigned)."""

    @property
    def topic_arn(self) -> str:
        return self.fields["TopicArn"]

    @property
    def message_id(self) -> str:
        return self.fields["MessageId"]

    def signed_bytes(self) -> bytes:
        """The string the signature covers, UTF-8."""
        parts = []
        for key in _SIGNED_KEYS[self.type]:
            value = self.fields.get(key)
            if value is not None:
                parts.append(f"{key}\n{value}\n")
        return "".join(parts).encode()


def parse_envelope(body: bytes) -> Envelope:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError(f"the body is not JSON ({exc}): SNS posts a JSON envelope") from None
    if not isinstance(data, dict):
        raise EnvelopeError("the body is not a JSON object: SNS posts a JSON envelope")
    kind = data.get("Type")
    if kind not in _SIGNED_KEYS:
        raise EnvelopeError(
            f"Type {kind!r} is not Notification, SubscriptionConfirmation or UnsubscribeConfirmation"
        )
    fields: dict[str, str] = {}
    for key in (*_SIGNED_KEYS[kind], *_SIGNING):
        value = data.get(key)
        if value is None and key in _OPTIONAL:
            continue
        fields[key] = _text(key, value)
    return Envelope(
        type=kind,
        signature_version=fields.pop("SignatureVersion"),
        signature=fields.pop("Signature"),
        signing_cert_url=fields.pop("SigningCertURL"),
        fields=fields,
        attributes=_attributes(data.get("MessageAttributes")),
    )


def _text(key: str, value: Any) -> str:
    if value is None:
        raise EnvelopeError(f"{key} is missing")
    if not isinstance(value, str):
        raise EnvelopeError(f"{key} is a {type(value).__name__}, not a string")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise EnvelopeError(f"{key} is not valid Unicode (a lone surrogate escape)") from None
    return value


def _attributes(raw: Any) -> tuple[tuple[str, str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise EnvelopeError("MessageAttributes is not an object of {Type, Value} entries")
    out = []
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("Type"), str):
            raise EnvelopeError(f"MessageAttributes[{name!r}] is not a {{Type, Value}} object")
        value = entry.get("Value")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise EnvelopeError(f"MessageAttributes[{name!r}].Value is not a string or number")
        out.append((name, entry["Type"], value if isinstance(value, str) else json.dumps(value)))
    return tuple(out)
