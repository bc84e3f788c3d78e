"""Pure decisions of the RabbitMQ source, tested without a broker: how many deliveries a
message has had, how long it waits before the next, and what each outcome leads to."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastconn.backoff import doubling
from fastconn.message import Outcome, Verdict
from fastconn.sources.rabbitmq.config import RETRY_MARK

__all__ = [
    "Ack",
    "DeadLetter",
    "Decision",
    "Keep",
    "Retry",
    "decide",
    "delay_levels",
    "deliveries",
    "message_digest",
    "retry_level",
    "retry_queue",
]


@dataclass(frozen=True, slots=True)
class Ack:
    """Delivered (or nothing subscribes): acknowledge."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A retryable failure: deliver again after ``delay`` seconds. ``in_place``: in this
    process while the core holds the key (key order); else through a retry queue."""

    delay: float
    in_place: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Failed for good: publish to the dead-letter exchange, then acknowledge."""

    reason: str


@dataclass(frozen=True, slots=True)
class Keep:
    """Failed for good without a dead-letter exchange: retried after ``delay``, counted stuck."""

    reason: str
    delay: float


Decision = Ack | Retry | DeadLetter | Keep


def retry_queue(queue: str, delay: float) -> str:
    """The retry queue holding ``queue``'s messages for ``delay`` seconds."""
    return f"{queue}{RETRY_MARK}{round(delay * 1000)}ms"


def delay_levels(initial: float, maximum: float) -> tuple[float, ...]:
    """The delays retry queues exist for: ``initial`` doubling up to ``maximum``. One queue per
    delay, because a broker expires only the head of a queue: a long per-message TTL there
    would hold back shorter ones behind it."""
    levels: list[float] = []
    attempt = 1
    while not levels or levels[-1] < maximum:
        levels.append(doubling(attempt, initial, maximum))
        attempt += 1
    return tuple(levels)


def retry_level(levels: tuple[float, ...], deliveries: int, retry_after: float | None) -> float:
    """The delay before the next delivery: the function's ``Retry-After`` rounded up to a
    level, else doubling per delivery."""
    if retry_after is not None:
        return next((level for level in levels if level >= retry_after), levels[-1])
    return levels[min(max(deliveries - 1, 0), len(levels) - 1)]


def deliveries(headers: Mapping[str, Any] | None, queue: str, redelivered: bool) -> int:
    """This delivery's number: 1, plus the passes through ``queue``'s retry queues the
    broker recorded in ``x-death``, plus a quorum queue's ``x-delivery-count`` (redeliveries
    after a crash or a lost connection)."""
    if not headers:
        return 1
    count = 1
    prefix = f"{queue}{RETRY_MARK}"
    deaths = headers.get("x-death")
    if isinstance(deaths, Iterable) and not isinstance(deaths, str | bytes):
        for death in deaths:
            if not isinstance(death, Mapping):
                continue
            name = _text(death.get("queue"))
            if name.startswith(prefix) and _text(death.get("reason")) == "expired":
                n = death.get("count")
                count += n if isinstance(n, int) and n > 0 else 1
    delivery_count = headers.get("x-delivery-count")
    if isinstance(delivery_count, int) and delivery_count > 0:
        count += delivery_count
    return count


def message_digest(exchange: str, routing_key: str, body: bytes, timestamp: object) -> str:
    """The message id of a message published without one: stable across redeliveries (the
    broker keeps all of these), the same for identical publishes without a timestamp."""
    h = hashlib.sha256()
    for part in (exchange.encode(), routing_key.encode(), str(timestamp or "").encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return f"amqp-{h.hexdigest()[:32]}"


def decide(
    outcome: Outcome,
    *,
    deliveries: int,
    max_deliver: int,
    dead_letters: bool,
    stopping: bool,
    levels: tuple[float, ...],
) -> Decision:
    """The settlement of one outcome (``max_deliver`` -1: unlimited)."""
    verdict = outcome.verdict
    if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
        return Ack()
    spent = 0 < max_deliver <= deliveries
    if verdict is Verdict.RETRY and not spent:
        delay = retry_level(levels, deliveries, outcome.retry_after)
        return Retry(delay, in_place=outcome.key_held and not stopping)
    reason = f"max_deliver ({max_deliver}) reached" if verdict is Verdict.RETRY else "non-retryable failure"
    if dead_letters:
        return DeadLetter(reason)
    return Keep(reason, levels[-1])


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""
