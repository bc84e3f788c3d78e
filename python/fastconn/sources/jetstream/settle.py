"""What to do with a message once its outcome is known: pure decisions, tested without a
server. The source carries them out (ack, nak, dead-letter publish, in-place retry)."""

from __future__ import annotations

from dataclasses import dataclass

from fastconn.backoff import doubling
from fastconn.message import Outcome, Verdict

__all__ = [
    "Ack",
    "DeadLetter",
    "Decision",
    "Keep",
    "Redeliver",
    "decide",
    "key_still_held",
    "redelivery_delay",
    "server_drops",
]


@dataclass(frozen=True, slots=True)
class Ack:
    """Delivered (or nothing subscribes): acknowledge."""


@dataclass(frozen=True, slots=True)
class Redeliver:
    """A retryable failure: deliver again after ``delay`` seconds. ``in_place``: retry in
    this process while the core keeps the key busy (so the key's order holds); otherwise
    ``nak`` with the delay and let the server redeliver."""

    delay: float
    in_place: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Failed for good: publish to the dead-letter subject, then ``term``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Keep:
    """Failed for good without a dead-letter subject: ``nak`` with ``delay`` (the message
    stays in the stream and comes back), counted and logged as stuck."""

    reason: str
    delay: float


Decision = Ack | Redeliver | DeadLetter | Keep


def key_still_held(outcome: Outcome) -> bool:
    """Whether the core still holds the message's ordering key after this outcome (so the
    source must resume the message, or release the key)."""
    # The core says so with every outcome (async invocation included, where the async layer
    # holds the key until the last callback); sources never infer it from their own flags.
    return outcome.key_held


def redelivery_delay(deliveries: int, retry_after: float | None, initial: float, maximum: float) -> float:
    """The wait before the next delivery: the function's ``Retry-After`` when it sent one,
    else doubling from ``initial`` per delivery; never above ``maximum``."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), maximum)
    return doubling(deliveries, initial, maximum)


def server_drops(server_max_deliver: int, server_deliveries: int) -> bool:
    """Whether a message handed back (nak) after its ``server_deliveries``-th delivery will
    never come again: the consumer has a server-side limit (an existing consumer that refused
    the update to unlimited) and it is reached."""
    return 0 < server_max_deliver <= server_deliveries


def decide(
    outcome: Outcome,
    *,
    deliveries: int,
    max_deliver: int,
    dead_letters: bool,
    stopping: bool,
    nak_delay: float,
    nak_delay_max: float,
) -> Decision:
    """The settlement of one outcome. ``deliveries`` counts this delivery (the server's count
    plus in-place retries); ``max_deliver`` -1 means unlimited."""
    verdict = outcome.verdict
    if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
        return Ack()
    spent = 0 < max_deliver <= deliveries
    if verdict is Verdict.RETRY and not spent:
        delay = redelivery_delay(deliveries, outcome.retry_after, nak_delay, nak_delay_max)
        return Redeliver(delay, in_place=key_still_held(outcome) and not stopping)
    reason = f"max_deliver ({max_deliver}) reached" if verdict is Verdict.RETRY else "non-retryable failure"
    if dead_letters:
        return DeadLetter(reason)
    return Keep(reason, nak_delay_max)
