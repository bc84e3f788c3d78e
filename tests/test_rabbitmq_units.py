"""The RabbitMQ source's configuration and pure decisions, without a broker."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict
from fastconn.sources.rabbitmq.acks import AckWindow
from fastconn.sources.rabbitmq.config import RabbitMQConfig
from fastconn.sources.rabbitmq.headers import amqp_headers
from fastconn.sources.rabbitmq.settle import (
    Ack,
    DeadLetter,
    Keep,
    Retry,
    decide,
    delay_levels,
    deliveries,
    message_digest,
    retry_level,
    retry_queue,
)

URL = "amqp://guest:guest@127.0.0.1:5672/"


def outcome(verdict: Verdict, *, key_held: bool = False, retry_after: float | None = None) -> Outcome:
    status = {Verdict.OK: 200, Verdict.RETRY: 503, Verdict.FAILED: 400, Verdict.UNROUTED: 0}[verdict]
    results = (
        ()
        if verdict is Verdict.UNROUTED
        else (TargetResult("fn", status, ErrorKind.NONE, 1, 0.01, retry_after),)
    )
    return Outcome(Message("q", b""), verdict, "id", results, key_held=key_held)


def test_queues_as_names_tables_and_the_openfaas_env(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RabbitMQConfig.model_validate(
        {
            "url": URL,
            "queues": ["a", {"name": "b", "durable": False, "arguments": {"x-queue-type": "quorum"}}],
        }
    )
    assert [(q.name, q.durable) for q in config.queues] == [("a", True), ("b", False)]
    assert config.queues[1].arguments == {"x-queue-type": "quorum"}
    monkeypatch.setenv("rabbitmq_url", URL)
    monkeypatch.setenv("queues", '["orders", "billing"]')
    from_env = RabbitMQConfig.model_validate({})
    assert from_env.url == URL
    assert [q.name for q in from_env.queues] == ["orders", "billing"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "http://x", "queues": ["a"]}, "url: expected amqp://"),
        ({"url": URL, "queues": []}, "queues: required"),
        ({"url": URL, "queues": ["a", "a"]}, "listed twice"),
        ({"url": URL, "queues": ["a b"]}, "expected 1-200 letters"),
        ({"url": URL, "queues": ["a.fastconn-retry.1000ms"]}, "retry queues"),
        ({"url": URL, "queues": ["a", "b"], "bindings": [{"exchange": "x"}]}, "bindings[0]: set queue"),
        ({"url": URL, "queues": ["a"], "bindings": [{"exchange": "x", "queue": "c"}]}, "not one of queues"),
        ({"url": URL, "queues": ["a"], "retry_delay": "2s", "backoff_max": "1s"}, "backoff_max must be >="),
        ({"url": URL, "queues": ["a"], "max_deliver": 0}, "max_deliver: must be at least 1"),
        ({"url": URL, "queues": ["a"], "ordering_key": "a b"}, "ordering_key"),
        ({"url": URL, "queues": ["a"], "dead_letter_routing_key": "k"}, "needs dead_letter_exchange"),
        ({"url": URL, "queues": ["a"], "prefetch": 0}, "prefetch"),
        ({"url": URL, "queues": ["a"], "unknown": 1}, "unknown"),
    ],
)
def test_bad_config_names_the_problem(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RabbitMQConfig.model_validate(table)


def test_deliveries_count_passes_through_own_retry_queues_only() -> None:
    deaths = [
        {"queue": retry_queue("orders", 1.0), "reason": "expired", "count": 2},
        {"queue": retry_queue("orders", 2.0), "reason": "expired", "count": 1},
        {"queue": retry_queue("other", 1.0), "reason": "expired", "count": 5},
        {"queue": "orders", "reason": "rejected", "count": 1},
    ]
    assert deliveries(None, "orders", False) == 1
    assert deliveries({"x-death": deaths}, "orders", False) == 4
    assert deliveries({"x-delivery-count": 2}, "orders", True) == 3
    assert deliveries({"x-death": "garbage"}, "orders", False) == 1


def test_one_retry_queue_per_delay_level() -> None:
    levels = delay_levels(0.2, 1.0)
    assert levels == (0.2, 0.4, 0.8, 1.0)
    assert retry_level(levels, 1, None) == 0.2
    assert retry_level(levels, 3, None) == 0.8
    assert retry_level(levels, 9, None) == 1.0
    assert retry_level(levels, 1, 0.5) == 0.8  # Retry-After rounded up to a level
    assert retry_level(levels, 1, 30.0) == 1.0
    assert retry_queue("orders", 0.2) == "orders.fastconn-retry.200ms"


def test_digest_is_stable_and_distinguishes_messages() -> None:
    a = message_digest("x", "k", b"body", None)
    assert a == message_digest("x", "k", b"body", None)
    assert a.startswith("amqp-")
    assert len({a, message_digest("x", "k", b"other", None), message_digest("x", "k2", b"body", None)}) == 3
    assert message_digest("x", "k", b"body", 1) != a


def test_decisions() -> None:
    levels = delay_levels(1.0, 4.0)
    common = {"max_deliver": 3, "dead_letters": True, "stopping": False, "levels": levels}
    assert decide(outcome(Verdict.OK), deliveries=1, **common) == Ack()
    assert decide(outcome(Verdict.UNROUTED), deliveries=1, **common) == Ack()
    assert decide(outcome(Verdict.RETRY), deliveries=2, **common) == Retry(2.0, in_place=False)
    assert decide(outcome(Verdict.RETRY, key_held=True), deliveries=1, **common) == Retry(1.0, in_place=True)
    assert decide(outcome(Verdict.RETRY), deliveries=3, **common) == DeadLetter("max_deliver (3) reached")
    assert decide(outcome(Verdict.FAILED), deliveries=1, **common) == DeadLetter("non-retryable failure")
    no_dlx = {**common, "dead_letters": False}
    assert decide(outcome(Verdict.FAILED), deliveries=1, **no_dlx) == Keep("non-retryable failure", 4.0)
    unlimited = {**common, "max_deliver": -1}
    assert isinstance(decide(outcome(Verdict.RETRY), deliveries=100, **unlimited), Retry)


def test_amqp_headers_are_prefixed_and_cannot_spoof_the_sources_own() -> None:
    headers = amqp_headers(
        {
            "tenant": "acme",
            "n": 3,
            "flag": True,
            "raw": b"\xff",
            "nested": {"a": 1},
            "msg-id": "x",
            "x-death": [],
        }
    )
    assert headers == [("X-Rabbitmq-tenant", "acme"), ("X-Rabbitmq-n", "3"), ("X-Rabbitmq-flag", "true")]


def test_ack_window_never_covers_an_unsettled_delivery() -> None:
    window = AckWindow(linger=1.0)
    for tag in range(1, 7):
        window.delivered(tag)
    # 3 is still running: 1-2 go as one multiple ack, 4 waits for one.
    assert window.settle([1, 2, 4], now=0.0) == 2
    assert len(window) == 3
    assert window.overdue(0.5) == (None, [])
    # 4 waited long enough: acked alone, and not again by a later multiple ack's count.
    assert window.overdue(1.0) == (None, [4])
    # 3 handed back to the broker (nacked, not acked from here): 5 and 6 go as a multiple ack.
    window.forget([3])
    assert window.settle([6, 5], now=1.0) == 6
    assert len(window) == 0
    assert not window.pending
    assert window.settle([], now=2.0) is None


def test_ack_window_after_a_forget_hands_out_the_multiple_ack_it_allows() -> None:
    window = AckWindow(linger=1.0)
    for tag in (1, 2, 3):
        window.delivered(tag)
    assert window.settle([2, 3], now=0.0) is None
    window.forget([1])
    assert window.pending
    assert window.overdue(0.0) == (3, [])
    assert not window.pending


def test_ack_window_holds_a_multiple_ack_until_it_covers_a_batch() -> None:
    window = AckWindow(linger=1.0, batch=3)
    for tag in range(1, 6):
        window.delivered(tag)
    assert window.settle([2, 1], now=0.0) is None
    assert window.settle([3], now=0.0) == 3
    assert window.settle([4], now=0.0) is None
    assert window.pending
    # Asked for what is due: the multiple ack however few it covers; 5 is still running.
    assert window.overdue(0.001) == (4, [])
    assert not window.pending


@pytest.mark.parametrize("seed", range(20))
def test_ack_window_against_a_broker_model(seed: int) -> None:
    """Random settle orders, nacks and clock steps: every ack the window hands out is one the
    broker accepts (the tag is outstanding) and covers no unsettled or nacked delivery; in
    the end every settled delivery is acknowledged."""
    rng = random.Random(seed)
    window = AckWindow(linger=0.05, batch=rng.choice([1, 3, 50]))
    outstanding: set[int] = set()  # the broker's unacknowledged deliveries
    running: set[int] = set()  # delivered, not settled here
    acked: set[int] = set()
    now = 0.0

    def ack(tag: int, multiple: bool) -> None:
        assert tag in outstanding, f"unknown delivery tag {tag}"
        covered = {t for t in outstanding if t <= tag} if multiple else {tag}
        assert not covered & running, f"ack {tag} covers unsettled {covered & running}"
        outstanding.difference_update(covered)
        acked.update(covered)

    next_tag = 1
    for _ in range(400):
        now += rng.choice([0.0, 0.001, 0.01, 0.06])
        for _ in range(rng.randint(0, 5)):
            window.delivered(next_tag)
            outstanding.add(next_tag)
            running.add(next_tag)
            next_tag += 1
        done = rng.sample(sorted(running), k=min(len(running), rng.randint(0, 4)))
        nacked = [t for t in done if rng.random() < 0.1]
        settled = [t for t in done if t not in nacked]
        running.difference_update(done)
        for tag in nacked:
            outstanding.discard(tag)  # the nack is sent before the window forgets the tag
        window.forget(nacked)
        upto = window.settle(settled, now)
        if upto is not None:
            ack(upto, multiple=True)
        if rng.random() < 0.3:
            upto, singles = window.overdue(now)
            if upto is not None:
                ack(upto, multiple=True)
            for tag in singles:
                ack(tag, multiple=False)
    upto, singles = window.overdue(float("inf"))
    if upto is not None:
        ack(upto, multiple=True)
    for tag in singles:
        ack(tag, multiple=False)
    assert outstanding == running, "every settled delivery acknowledged, nothing else"
