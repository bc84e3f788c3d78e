"""What the Kafka source does with a message once its outcome is known: pure decisions,
tested without a broker. The source carries them out (mark done, publish, redeliver)."""

from __future__ import annotations

from dataclasses import dataclass

from fastconn.backoff import doubling
from fastconn.message import Outcome, Verdict

__all__ = ["DeadLetter", "Decision", "Done", "RetryLater", "decide", "key_still_held", "retry_delay"]


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
    m = outcome.message
    if m.key is None:
        return False
    return (outcome.verdict is Verdict.RETRY and m.hold_key_on_retry) or (
        outcome.verdict is Verdict.FAILED and m.hold_key_on_failure
    )


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
