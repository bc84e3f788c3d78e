"""The failure context written on every dead letter, by every source.

Each source adds its own coordinates (Kafka topic/partition/offset, NATS stream/sequence)
under ``fastconn-dlt-original-*`` names; the rest is shared so one consumer of dead letters
reads every source's the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from fastconn.message import Outcome

__all__ = [
    "DLT_ATTEMPTS",
    "DLT_DELIVERIES",
    "DLT_ERROR",
    "DLT_FAILED",
    "DLT_FUNCTION",
    "DLT_HEADERS_DROPPED",
    "DLT_MESSAGE_ID",
    "DLT_PREFIX",
    "DLT_REASON",
    "DLT_RESPONSE",
    "DLT_STATUS",
    "DLT_TIME",
    "DLT_TRUNCATED",
    "RESPONSE_EXCERPT",
    "failure_context",
    "response_excerpt",
]

DLT_PREFIX: Final = "fastconn-dlt-"
"""Every context header starts with it: a re-dead-lettered message's stale context is dropped."""
DLT_FUNCTION: Final = "fastconn-dlt-function"
DLT_STATUS: Final = "fastconn-dlt-status"
DLT_ATTEMPTS: Final = "fastconn-dlt-attempts"
DLT_ERROR: Final = "fastconn-dlt-error"
DLT_RESPONSE: Final = "fastconn-dlt-response"
DLT_FAILED: Final = "fastconn-dlt-failed-functions"
DLT_MESSAGE_ID: Final = "fastconn-dlt-message-id"
DLT_DELIVERIES: Final = "fastconn-dlt-deliveries"
DLT_REASON: Final = "fastconn-dlt-reason"
DLT_TIME: Final = "fastconn-dlt-time"
DLT_TRUNCATED: Final = "fastconn-dlt-truncated"
"""Set when the payload was cut to fit the destination: the original size in bytes."""
DLT_HEADERS_DROPPED: Final = "fastconn-dlt-headers-dropped"
"""Set when the message's own headers were left out to fit the destination: how many."""
RESPONSE_EXCERPT: Final = 1024
"""Bytes of the failing function's response body kept in ``fastconn-dlt-response``."""


def failure_context(
    outcome: Outcome, origin: Sequence[tuple[str, str]], *, deliveries: int, reason: str
) -> list[tuple[str, str]]:
    """The context headers of one dead letter: ``origin`` (the source's own
    ``fastconn-dlt-original-*`` coordinates), then the message id, deliveries, reason, time and
    the functions that failed, with the first failure's function, status, attempts and error.
    The response excerpt is separate (:func:`response_excerpt`): sources carry it differently."""
    failed = [r for r in outcome.results if not r.ok]
    context = [
        *origin,
        (DLT_MESSAGE_ID, outcome.message_id),
        (DLT_DELIVERIES, str(deliveries)),
        (DLT_REASON, reason),
        (DLT_TIME, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        (DLT_FAILED, ",".join(r.function for r in failed)),
    ]
    if failed:
        first = failed[0]
        context += [
            (DLT_FUNCTION, first.function),
            (DLT_STATUS, str(first.status)),
            (DLT_ATTEMPTS, str(first.attempts)),
            (DLT_ERROR, f"HTTP {first.status}" if first.status else first.error.label),
        ]
    return context


def response_excerpt(outcome: Outcome) -> bytes | None:
    """The start of the first failing function's response body, when it sent one."""
    first = outcome.first_failure()
    if first is None or not first.body:
        return None
    return first.body[:RESPONSE_EXCERPT]
