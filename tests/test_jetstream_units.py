"""The JetStream source's pure parts: pull-request bookkeeping and settle decisions."""

from __future__ import annotations

import pytest

from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict
from fastconn.sources.jetstream.pull import PullWindow, pull_room
from fastconn.sources.jetstream.restart import RestartGate
from fastconn.sources.jetstream.settle import (
    Ack,
    DeadLetter,
    Keep,
    Redeliver,
    decide,
    key_still_held,
    redelivery_delay,
    server_drops,
)

# -- pull window ------------------------------------------------------------------------------


def test_delivered_messages_use_up_the_oldest_request_first() -> None:
    window = PullWindow(0.0, silence=15.0)
    window.opened(2, 0.0, 30.0)
    window.opened(3, 0.0, 30.0)
    assert (window.requested, len(window)) == (5, 2)
    window.delivered()
    window.delivered()
    assert (window.requested, len(window)) == (3, 1)
    window.ended()  # the second ends with 3 unsent
    assert (window.requested, len(window)) == (0, 0)


def test_a_request_whose_end_never_came_is_dropped_after_its_expiry() -> None:
    window = PullWindow(0.0, silence=15.0)
    window.opened(4, 0.0, 30.0)
    window.heard(31.0)
    assert not window.expire(31.0)
    assert window.requested == 4  # within the grace for a late 408
    assert not window.expire(32.5)
    assert (window.requested, len(window)) == (0, 0)


def test_silence_means_the_requests_are_gone() -> None:
    window = PullWindow(0.0, silence=15.0)
    window.opened(4, 0.0, 30.0)
    window.heard(10.0)
    assert not window.expire(20.0)
    assert window.expire(25.5)
    window.reset(25.5)
    assert (window.requested, len(window)) == (0, 0)


def test_room_is_bounded_by_the_window_and_by_free_dispatcher_capacity() -> None:
    assert pull_room(window=100, capacity=100, queued=0, inflight=0, buffered=0, requested=0) == 100
    assert pull_room(window=10, capacity=100, queued=0, inflight=4, buffered=0, requested=3) == 3
    assert pull_room(window=100, capacity=100, queued=90, inflight=0, buffered=5, requested=0) == 5
    assert pull_room(window=10, capacity=100, queued=0, inflight=12, buffered=0, requested=0) == 0


# -- settle decisions -------------------------------------------------------------------------


def _outcome(
    verdict: Verdict, *, key: bytes | None = b"k", retry_after: float | None = None, status: int = 503
) -> Outcome:
    message = Message("t", b"", key=key, hold_key_on_retry=key is not None)
    result = TargetResult("fn", status, ErrorKind.NONE, 1, 0.0, retry_after=retry_after)
    # What the core reports for these flags: the key stays held after a RETRY only.
    held = key is not None and verdict is Verdict.RETRY
    return Outcome(message, verdict, "S/1", (result,), key_held=held)


def _decide(outcome: Outcome, **overrides: object) -> object:
    options: dict[str, object] = {
        "deliveries": 1,
        "max_deliver": 5,
        "dead_letters": True,
        "stopping": False,
        "nak_delay": 1.0,
        "nak_delay_max": 60.0,
    }
    options.update(overrides)
    return decide(outcome, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("verdict", [Verdict.OK, Verdict.UNROUTED])
def test_success_and_unrouted_are_acked(verdict: Verdict) -> None:
    assert _decide(_outcome(verdict)) == Ack()


def test_retryable_failure_with_a_key_is_retried_in_place_with_growing_delay() -> None:
    assert _decide(_outcome(Verdict.RETRY), deliveries=1) == Redeliver(1.0, in_place=True)
    assert _decide(_outcome(Verdict.RETRY), deliveries=3) == Redeliver(4.0, in_place=True)


def test_without_a_key_or_while_stopping_the_server_redelivers() -> None:
    assert _decide(_outcome(Verdict.RETRY, key=None)) == Redeliver(1.0, in_place=False)
    assert _decide(_outcome(Verdict.RETRY), stopping=True) == Redeliver(1.0, in_place=False)


def test_retry_after_replaces_the_backoff_within_the_cap() -> None:
    assert redelivery_delay(1, 7.0, 1.0, 60.0) == 7.0
    assert redelivery_delay(1, 600.0, 1.0, 60.0) == 60.0
    assert redelivery_delay(1, -3.0, 1.0, 60.0) == 0.0


def test_spent_deliveries_dead_letter_or_keep() -> None:
    outcome = _outcome(Verdict.RETRY)
    assert _decide(outcome, deliveries=5) == DeadLetter("max_deliver (5) reached")
    assert _decide(outcome, deliveries=5, dead_letters=False) == Keep("max_deliver (5) reached", 60.0)
    assert isinstance(_decide(outcome, deliveries=500, max_deliver=-1), Redeliver)  # unlimited


def test_non_retryable_failure_dead_letters_at_once() -> None:
    outcome = _outcome(Verdict.FAILED, status=400)
    assert _decide(outcome) == DeadLetter("non-retryable failure")
    assert _decide(outcome, dead_letters=False) == Keep("non-retryable failure", 60.0)


def test_whether_the_key_is_held_is_the_cores_word_not_a_guess_from_flags() -> None:
    retry = _outcome(Verdict.RETRY)
    assert key_still_held(retry)
    # The same flags, but the core says it let the key go (e.g. the async layer settled it):
    # the source must not release it again, which would start the key's next-but-one message.
    assert not key_still_held(Outcome(retry.message, Verdict.RETRY, "S/1", key_held=False))
    assert not key_still_held(_outcome(Verdict.FAILED, status=400))
    assert not key_still_held(_outcome(Verdict.OK, status=200))


# -- restart gate -----------------------------------------------------------------------------


def test_restart_gate_holds_until_every_unacked_message_is_back_then_releases_in_stream_order() -> None:
    gate: RestartGate[str] = RestartGate(pending=2, last_delivered=10, now=0.0, ack_wait=2.0)
    gate.hold(12, "new-12")  # never delivered before: served at once by the server
    gate.hold(9, "old-9")
    assert (gate.remaining, gate.held) == (1, 2)
    assert not gate.ready(1.0)
    gate.hold(9, "old-9-again")  # a duplicate does not count twice
    assert not gate.ready(1.0)
    gate.hold(4, "old-4")
    assert gate.ready(1.0)
    assert gate.release() == ["old-4", "old-9", "old-9-again", "new-12"]
    assert gate.held == 0


def test_restart_gate_gives_up_after_ack_wait_and_a_grace() -> None:
    gate: RestartGate[str] = RestartGate(pending=3, last_delivered=10, now=100.0, ack_wait=2.0)
    gate.hold(11, "new")
    assert not gate.ready(102.9)
    assert gate.ready(103.0)  # 2 s ack_wait + 1 s grace
    assert gate.release() == ["new"]
    long_wait: RestartGate[str] = RestartGate(pending=1, last_delivered=1, now=0.0, ack_wait=30.0)
    assert long_wait.deadline == 45.0


def test_server_drops_only_at_its_own_finite_limit() -> None:
    assert not server_drops(-1, 1000)  # the consumer fastconn creates: unlimited
    assert not server_drops(3, 2)
    assert server_drops(3, 3)  # an existing consumer that refused the update: this nak is its last
