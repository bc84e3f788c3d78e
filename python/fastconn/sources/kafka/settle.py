"""What the Kafka source does with a message once its outcome is known: pure decisions,
tested without a broker. The source carries them out (mark done, publish, redeliver)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fastconn.backoff import doubling
from fastconn.deadletter import DLT_HEADERS_DROPPED, DLT_PREFIX, DLT_RESPONSE, DLT_TRUNCATED
from fastconn.message import Outcome, Verdict

__all__ = [
    "TRUNCATED_PAYLOAD",
    "DeadLetter",
    "Decision",
    "Done",
    "RetryLater",
    "decide",
    "key_still_held",
    "retry_delay",
    "smaller_dead_letter",
]

TRUNCATED_PAYLOAD: Final = 1024
"""Bytes of the payload a dead letter keeps when the broker refused the whole as too large."""


@dataclass(frozen=True, slots=True)
class Done:
    """Delivered (or nothing subscribes). ``publish_responses``: publish the functions'
    responses first, then the message is done."""

    publish_responses: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Failed for good: write it to the dead-letter topic, then it is done."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Not done: resubmit after ``delay`` seconds. ``key_held``: the core keeps the key busy
    meanwhile, so the resubmission resumes it."""

    delay: float
    key_held: bool


Decision = Done | DeadLetter | RetryLater


def key_still_held(outcome: Outcome) -> bool:
    """Whether the core still holds the message's ordering key after this outcome (so the
    source must resume the message, or release the key)."""
    # The core says so with every outcome (async invocation included, where the async layer
    # holds the key until the last callback); sources never infer it from their own flags.
    return outcome.key_held


def retry_delay(deliveries: int, retry_after: float | None, initial: float, maximum: float) -> float:
    """The wait before redelivery number ``deliveries``: doubling from ``initial`` up to
    ``maximum``, and at least the function's ``Retry-After``."""
    delay = doubling(deliveries, initial, maximum)
    if retry_after:
        delay = max(delay, retry_after)
    return delay


def decide(
    outcome: Outcome,
    *,
    deliveries: int,
    dead_letters: bool,
    responses: bool,
    backoff_initial: float,
    backoff_max: float,
) -> Decision:
    """The settlement of one outcome. Without a dead-letter topic a final failure is retried
    like a retryable one: nothing is dropped."""
    verdict = outcome.verdict
    if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
        return Done(publish_responses=responses and bool(outcome.results))
    if verdict is Verdict.FAILED and dead_letters:
        return DeadLetter()
    delay = retry_delay(deliveries, outcome.retry_after, backoff_initial, backoff_max)
    return RetryLater(delay, key_held=key_still_held(outcome))


def smaller_dead_letter(
    value: bytes, headers: list[tuple[str, bytes]], refusals: int
) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """What to send after the broker refused a dead letter as too large ``refusals`` times, so
    the message can be done and the commit move on. In turn, each only when it is smaller:

    1. the payload cut to its first :data:`TRUNCATED_PAYLOAD` bytes, ``fastconn-dlt-truncated``
       giving the original size;
    2. also without the message's own headers and the response excerpt: only fastconn's failure
       context, ``fastconn-dlt-headers-dropped`` saying how many were left out.

    None: nothing smaller to try (the source keeps retrying and reports the message stuck)."""
    forms: list[tuple[bytes, list[tuple[str, bytes]]]] = []
    cut = value[:TRUNCATED_PAYLOAD]
    marks = [(DLT_TRUNCATED, str(len(value)).encode())] if len(cut) < len(value) else []
    if marks:
        forms.append((cut, [*headers, *marks]))
    context = [(k, v) for k, v in headers if k.startswith(DLT_PREFIX) and k != DLT_RESPONSE]
    own = sum(1 for k, _ in headers if not k.startswith(DLT_PREFIX))
    if len(context) < len(headers):
        forms.append((cut, [*context, *marks, (DLT_HEADERS_DROPPED, str(own).encode())]))
    return forms[refusals - 1] if 1 <= refusals <= len(forms) else None
