"""The gap-free watermark: out-of-order completions never move a commit past an unfinished
position."""

from __future__ import annotations

import random

import pytest

from fastconn.watermark import Watermark, Watermarks


def test_empty_watermark_commits_nothing() -> None:
    mark = Watermark()
    assert mark.committable is None
    assert mark.done_through is None
    assert mark.to_commit() is None
    assert mark.outstanding == 0
    assert mark.in_flight == 0


def test_in_order_completion_advances_one_by_one() -> None:
    mark = Watermark()
    for offset in range(3):
        mark.track(offset)
    assert mark.committable == 0
    assert mark.complete(0)
    assert mark.committable == 1
    assert mark.done_through == 0
    assert mark.complete(1)
    assert mark.complete(2)
    assert mark.committable == 3, "all done: commit one past the newest"
    assert mark.done_through == 2
    assert mark.outstanding == 0


def test_out_of_order_completion_waits_for_the_gap() -> None:
    mark = Watermark()
    for offset in range(10):
        mark.track(offset)
    for offset in range(10):
        if offset != 5:
            mark.complete(offset)
    assert mark.committable == 5, "offset 5 is unfinished: nothing at or past it may be committed"
    assert mark.done_through == 4
    assert mark.in_flight == 1
    assert mark.outstanding == 5, "5..9 are held back by 5"
    assert mark.unfinished() == [5]
    assert mark.complete(5), "finishing the gap moves the watermark"
    assert mark.committable == 10
    assert mark.outstanding == 0


def test_completion_that_does_not_move_the_watermark_returns_false() -> None:
    mark = Watermark()
    mark.track(0)
    mark.track(1)
    assert not mark.complete(1)
    assert mark.complete(0)


def test_offsets_with_gaps_compacted_topic() -> None:
    mark = Watermark()
    for offset in (3, 7, 8, 20):
        mark.track(offset)
    assert mark.committable == 3
    mark.complete(3)
    assert mark.committable == 7, "positions that were never messages are skipped"
    mark.complete(8)
    assert mark.committable == 7
    mark.complete(7)
    assert mark.committable == 20
    assert mark.done_through == 8
    mark.complete(20)
    assert mark.committable == 21


def test_unknown_and_duplicate_completions_are_ignored() -> None:
    mark = Watermark()
    mark.track(10)
    assert not mark.complete(9)
    assert not mark.complete(11)
    assert mark.complete(10)
    assert not mark.complete(10), "a second completion of the same position changes nothing"
    assert mark.committable == 11


def test_tracking_must_increase() -> None:
    mark = Watermark()
    mark.track(5)
    with pytest.raises(ValueError, match="not above"):
        mark.track(5)
    with pytest.raises(ValueError, match="not above"):
        mark.track(2)


def test_to_commit_only_when_ahead_of_the_last_commit() -> None:
    mark = Watermark(committed=0)
    mark.track(0)
    assert mark.to_commit() is None, "0 is committed already (nothing new done)"
    mark.complete(0)
    assert mark.to_commit() == 1
    mark.mark_committed(1)
    assert mark.committed == 1
    assert mark.to_commit() is None
    mark.mark_committed(0)
    assert mark.committed == 1, "commits never move backwards"


def test_random_completion_orders_match_a_brute_force_model() -> None:
    rng = random.Random(42)
    for _ in range(200):
        positions = sorted(rng.sample(range(200), rng.randint(1, 60)))
        mark = Watermark()
        for p in positions:
            mark.track(p)
        order = positions[:]
        rng.shuffle(order)
        done: set[int] = set()
        for p in order:
            mark.complete(p)
            done.add(p)
            unfinished = [q for q in positions if q not in done]
            expected = unfinished[0] if unfinished else positions[-1] + 1
            assert mark.committable == expected
            assert mark.in_flight == len(unfinished)
            # Never past an unfinished position, and every position below it is done.
            assert all(q in done for q in positions if q < expected)
            below = [q for q in positions if q < expected]
            assert mark.done_through == (below[-1] if below else None)


def test_interleaved_track_and_complete() -> None:
    mark = Watermark()
    mark.track(0)
    mark.track(1)
    mark.complete(1)
    mark.track(2)
    assert mark.committable == 0
    mark.complete(0)
    assert mark.committable == 2
    mark.complete(2)
    mark.track(3)
    assert mark.committable == 3


def test_per_partition_watermarks_are_independent() -> None:
    marks: Watermarks[tuple[str, int]] = Watermarks()
    a, b = ("t", 0), ("t", 1)
    for offset in range(5):
        marks.track(a, offset)
        marks.track(b, offset)
    for offset in (0, 1, 3):
        marks.complete(a, offset)
    for offset in range(5):
        marks.complete(b, offset)
    assert marks.committable(a) == 2
    assert marks.committable(b) == 5
    assert marks.to_commit() == {a: 2, b: 5}
    marks.mark_committed({a: 2, b: 5})
    assert marks.to_commit() == {}
    assert not marks.complete(("t", 9), 0), "an unknown partition is ignored"
    assert marks.committable(("t", 9)) is None
    assert len(marks) == 2 and set(marks) == {a, b}
    removed = marks.remove(a)
    assert removed is not None and removed.committable == 2
    assert a not in marks
