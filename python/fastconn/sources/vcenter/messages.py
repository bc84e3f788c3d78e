"""A pyvmomi event as the parts of a message: topic, JSON body, headers (pure; runs on the
source's worker thread, since it walks pyvmomi objects)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from fastconn.sources.vcenter.events import class_name, created_time, event_json, topic_of

__all__ = ["CLOUDEVENTS_TYPE", "PendingEvent", "cloudevent_headers", "convert"]

CLOUDEVENTS_TYPE: Final = "com.vmware.event.router/event"
"""``ce-type`` of the CloudEvents output (the VMware Event Router's)."""


@dataclass(slots=True)
class PendingEvent:
    """One event read and not settled yet (a message's ``handle``)."""

    key: int
    created: datetime
    topic: str
    payload: bytes
    headers: tuple[tuple[str, str], ...]
    deliveries: int = 1


def convert(event: Any, style: str, base: tuple[tuple[str, str], ...]) -> PendingEvent:
    """A pyvmomi event as the message parts (on the worker thread: it walks the object)."""
    name = class_name(event)
    headers = (
        *base,
        ("X-Vcenter-Event-Key", str(event.key)),
        ("X-Vcenter-Event-Class", name),
        ("X-Vcenter-Chain-Id", str(event.chainId)),
    )
    return PendingEvent(
        event.key,
        created_time(event),
        topic_of(event, style),
        orjson.dumps(event_json(event)),
        headers,
    )


def cloudevent_headers(event: PendingEvent, message_id: str, source: str) -> tuple[tuple[str, str], ...]:
    """CloudEvents binary-mode headers (the VMware Event Router's event shape)."""
    subject = dict(event.headers)["X-Vcenter-Event-Class"]
    when = event.created.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return (
        ("ce-specversion", "1.0"),
        ("ce-id", message_id),
        ("ce-source", source),
        ("ce-type", CLOUDEVENTS_TYPE),
        ("ce-subject", subject),
        ("ce-time", when),
    )
