"""Pure decisions of the SQS source, tested without a server: what a received message's
outcome leads to, how long it waits before it is received again, and what a dead letter
carries.

One received SQS message may be several messages for the core (``decode = "s3"``: one per
record); it is settled once all of them are, by the worst of their outcomes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastconn.backoff import doubling
from fastconn.deadletter import (
    DLT_HEADERS_DROPPED,
    DLT_PREFIX,
    DLT_RESPONSE,
    failure_context,
    response_excerpt,
)
from fastconn.message import Outcome, Verdict

__all__ = [
    "DLT_CONTEXT",
    "DLT_QUEUE_URL",
    "MAX_ATTRIBUTES",
    "DeadLetter",
    "Decision",
    "Delay",
    "Delete",
    "Redrive",
    "dead_letter_attributes",
    "decide",
    "retry_delay",
    "worse",
]

MAX_ATTRIBUTES: Final = 10
"""SQS carries at most 10 message attributes per message."""
DLT_QUEUE_URL: Final = "fastconn-dlt-original-queue-url"
DLT_CONTEXT: Final = "fastconn-dlt-context"
"""One attribute holding the whole failure context as JSON (the 10-attribute limit leaves no
room for each entry of it, the response excerpt and the message's own attributes)."""
_SEPARATE: Final = (
    DLT_QUEUE_URL,
    "fastconn-dlt-message-id",
    "fastconn-dlt-deliveries",
    "fastconn-dlt-reason",
    "fastconn-dlt-function",
    "fastconn-dlt-status",
    "fastconn-dlt-error",
)
"""Context entries that also get an attribute of their own (filters on a DLQ read these)."""


@dataclass(frozen=True, slots=True)
class Delete:
    """Delivered (or nothing subscribes, or nothing to deliver): delete."""


@dataclass(frozen=True, slots=True)
class Delay:
    """A retryable failure: hidden for ``seconds`` more, then received again."""

    seconds: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Failed for good: send to the dead-letter queue with the context, then delete."""

    reason: str


@dataclass(frozen=True, slots=True)
class Redrive:
    """Failed for good without a dead-letter queue: visible again at once, so the queue's
    redrive policy moves it after its ``maxReceiveCount``."""

    reason: str


Decision = Delete | Delay | DeadLetter | Redrive

_RANK: Final = {Verdict.OK: 0, Verdict.UNROUTED: 0, Verdict.RETRY: 1, Verdict.FAILED: 2}


def worse(current: Outcome | None, new: Outcome) -> Outcome:
    """The outcome that decides a message of several parts: the worst verdict, the first of a
    rank (its failure is the one the context reports)."""
    if current is None or _RANK[new.verdict] > _RANK[current.verdict]:
        return new
    return current


def retry_delay(attempts: int, retry_after: float | None, initial: float, maximum: float) -> float:
    """Seconds before the next receive: the function's ``Retry-After``, else doubling per
    attempt; never above ``maximum``."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), maximum)
    return doubling(attempts, initial, maximum)


def decide(
    outcome: Outcome | None,
    *,
    attempts: int,
    max_deliver: int,
    dead_letters: bool,
    initial: float,
    maximum: float,
) -> Decision:
    """The settlement of a message whose parts are all settled; ``outcome`` is the worst of
    them (None: the message had nothing to deliver, e.g. an ``s3:TestEvent``)."""
    if outcome is None or outcome.verdict in (Verdict.OK, Verdict.UNROUTED):
        return Delete()
    if outcome.verdict is Verdict.RETRY:
        if dead_letters and attempts >= max_deliver:
            return DeadLetter(f"max_deliver ({max_deliver}) reached")
        return Delay(retry_delay(attempts, outcome.retry_after, initial, maximum))
    reason = "non-retryable failure"
    return DeadLetter(reason) if dead_letters else Redrive(reason)


def dead_letter_attributes(
    outcome: Outcome | None,
    *,
    queue_url: str,
    message_id: str,
    deliveries: int,
    reason: str,
    original: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The message attributes of a dead letter: the context entries readers filter on, each on
    its own, the whole context as JSON in :data:`DLT_CONTEXT`, then as many of the message's own
    attributes as fit in SQS's ten (the count left out in ``fastconn-dlt-headers-dropped``)."""
    origin = [(DLT_QUEUE_URL, queue_url)]
    if outcome is not None:
        context = failure_context(outcome, origin, deliveries=deliveries, reason=reason)
        excerpt = response_excerpt(outcome)
    else:  # the message never reached a function (it could not be decoded)
        context = [
            *origin,
            ("fastconn-dlt-message-id", message_id),
            ("fastconn-dlt-deliveries", str(deliveries)),
            ("fastconn-dlt-reason", reason),
        ]
        excerpt = None
    full = dict(context)
    if excerpt is not None:
        full[DLT_RESPONSE] = excerpt.decode("utf-8", "replace")
    attributes: dict[str, Any] = {name: _string(full[name]) for name in _SEPARATE if name in full}
    attributes[DLT_CONTEXT] = _string(json.dumps(full, separators=(",", ":")))
    own = [(k, v) for k, v in (original or {}).items() if not k.lower().startswith(DLT_PREFIX)]
    room = MAX_ATTRIBUTES - len(attributes)
    if len(own) > room:
        room -= 1  # the count of dropped ones takes a place
        attributes[DLT_HEADERS_DROPPED] = _string(str(len(own) - room))
    for name, value in own[:room]:
        attributes[name] = _copyable(value)
    return attributes


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _copyable(value: Mapping[str, Any]) -> Any:
    """A received attribute as SendMessage takes it (receive adds no fields send refuses, but
    list values are reserved and must not be sent)."""
    return {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
