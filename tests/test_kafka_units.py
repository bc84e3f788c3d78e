"""The Kafka source's pure parts: per-partition state and settle decisions."""

from __future__ import annotations

from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict
from fastconn.sources.kafka.settle import DeadLetter, Done, RetryLater, decide, key_still_held, retry_delay
from fastconn.sources.kafka.state import Partition, fetch_budget


def _partition() -> Partition:
    return Partition("tp", b"t\x000\x00", (), "t/0/")


def test_partition_pauses_at_its_budget_and_resumes_below_half() -> None:
    part = _partition()
    for offset in range(4):
        part.mark.track(offset)
    assert part.should_pause(4)
    assert not part.should_pause(5)
    part.paused = True
    assert not part.should_pause(4)  # already paused
    assert not part.should_resume(2)
    part.mark.complete(0)
    part.mark.complete(1)
    part.mark.complete(2)
    assert part.should_resume(2)
    part.revoking = True
    assert not part.should_resume(2)  # a revoked partition is not fetched again


def test_fetch_budget_leaves_room_for_redeliveries() -> None:
    budget = {"max_poll_records": 500, "batch_size": 256}
    assert fetch_budget(capacity=1000, queued=0, stuck=0, **budget) == 256
    assert fetch_budget(capacity=1000, queued=900, stuck=0, **budget) == 100
    assert fetch_budget(capacity=1000, queued=400, stuck=450, **budget) == 150
    assert fetch_budget(capacity=1000, queued=400, stuck=5000, **budget) == 100  # reserve <= half
    assert fetch_budget(capacity=100, queued=100, stuck=0, **budget) == 0


def _outcome(verdict: Verdict, *, key: bytes | None = b"k", hold_on_failure: bool = False) -> Outcome:
    message = Message(
        "t", b"", key=key, hold_key_on_retry=key is not None, hold_key_on_failure=hold_on_failure
    )
    status = {Verdict.OK: 200, Verdict.RETRY: 503, Verdict.FAILED: 400}.get(verdict, 0)
    # What the core reports for these flags.
    held = key is not None and (verdict is Verdict.RETRY or (verdict is Verdict.FAILED and hold_on_failure))
    result = TargetResult("fn", status, ErrorKind.NONE, 1, 0.0)
    return Outcome(message, verdict, "t/0/1", (result,), key_held=held)


def _decide(outcome: Outcome, **overrides: object) -> object:
    options: dict[str, object] = {
        "deliveries": 1,
        "dead_letters": True,
        "responses": False,
        "backoff_initial": 1.0,
        "backoff_max": 60.0,
    }
    options.update(overrides)
    return decide(outcome, **options)  # type: ignore[arg-type]


def test_success_is_done_after_publishing_responses_when_asked() -> None:
    assert _decide(_outcome(Verdict.OK)) == Done(publish_responses=False)
    assert _decide(_outcome(Verdict.OK), responses=True) == Done(publish_responses=True)
    unrouted = Outcome(Message("t", b""), Verdict.UNROUTED, "t/0/1")
    assert _decide(unrouted, responses=True) == Done(publish_responses=False)  # nothing answered


def test_final_failure_dead_letters_or_is_retried_with_its_key_held() -> None:
    assert _decide(_outcome(Verdict.FAILED)) == DeadLetter()
    kept = _outcome(Verdict.FAILED, hold_on_failure=True)
    assert _decide(kept, dead_letters=False, deliveries=2) == RetryLater(2.0, key_held=True)


def test_retry_keeps_the_key_and_backs_off() -> None:
    assert _decide(_outcome(Verdict.RETRY), deliveries=3) == RetryLater(4.0, key_held=True)
    assert _decide(_outcome(Verdict.RETRY, key=None)) == RetryLater(1.0, key_held=False)


def test_retry_after_is_a_lower_bound() -> None:
    assert retry_delay(1, 30.0, 1.0, 60.0) == 30.0
    assert retry_delay(10, 2.0, 1.0, 60.0) == 60.0


def test_whether_the_key_is_held_is_the_cores_word_not_a_guess_from_flags() -> None:
    assert not key_still_held(_outcome(Verdict.FAILED))
    assert key_still_held(_outcome(Verdict.FAILED, hold_on_failure=True))
    assert key_still_held(_outcome(Verdict.RETRY))
    assert not key_still_held(_outcome(Verdict.OK))
    flags_say_held = _outcome(Verdict.RETRY).message
    assert not key_still_held(Outcome(flags_say_held, Verdict.RETRY, "t/0/1", key_held=False))
