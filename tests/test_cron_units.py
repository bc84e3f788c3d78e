"""The cron source's pure parts: schedule parsing, slots, the timeline, catch-up, policies."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from fastconn.sources.cron.config import Policy
from fastconn.sources.cron.schedule import ScheduleError, parse_every, parse_schedule
from fastconn.sources.cron.store import LocalStore, store_key
from fastconn.sources.cron.timeline import Timeline, catch_up_slots


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def iso(t: float, tz: str = "UTC") -> str:
    return datetime.fromtimestamp(t, ZoneInfo(tz)).isoformat()


def test_five_fields_fire_on_their_minutes() -> None:
    schedule = parse_schedule("*/5 * * * *")
    assert schedule.next_after(ts("2026-01-01T10:02:30")) == ts("2026-01-01T10:05:00")
    assert schedule.next_after(ts("2026-01-01T10:05:00")) == ts("2026-01-01T10:10:00")


def test_leading_seconds_field() -> None:
    schedule = parse_schedule("*/10 * * * * *")
    assert schedule.next_after(ts("2026-01-01T10:00:01")) == ts("2026-01-01T10:00:10")
    assert parse_schedule("30 0 * * * *").next_after(ts("2026-01-01T10:00:31")) == ts("2026-01-01T11:00:30")


def test_descriptors() -> None:
    assert parse_schedule("@hourly").next_after(ts("2026-01-01T10:20:00")) == ts("2026-01-01T11:00:00")
    assert parse_schedule("@daily").next_after(ts("2026-01-01T10:20:00")) == ts("2026-01-02T00:00:00")
    assert parse_schedule("@midnight").next_after(ts("2026-01-01T10:20:00")) == ts("2026-01-02T00:00:00")


def test_every_is_aligned_to_the_epoch_so_replicas_agree() -> None:
    schedule = parse_schedule("@every 30s")
    assert schedule.next_after(ts("2026-01-01T10:00:07")) == ts("2026-01-01T10:00:30")
    assert schedule.next_after(ts("2026-01-01T10:00:30")) == ts("2026-01-01T10:01:00")
    assert parse_every("1h30m") == 5400
    assert parse_every("500ms") == 1  # robfig: at least one second
    assert parse_every("2.7s") == 2  # whole seconds


def test_a_semicolon_list_is_the_union_of_its_expressions() -> None:
    schedule = parse_schedule("0 9 * * *; 30 17 * * * ;")
    t = ts("2026-01-01T08:00:00")
    fires = []
    for _ in range(4):
        t = schedule.next_after(t)
        fires.append(iso(t))
    assert fires == [
        "2026-01-01T09:00:00+00:00",
        "2026-01-01T17:30:00+00:00",
        "2026-01-02T09:00:00+00:00",
        "2026-01-02T17:30:00+00:00",
    ]


def test_timezone_moves_the_slot() -> None:
    paris = parse_schedule("0 9 * * *", "Europe/Paris")
    # 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert iso(paris.next_after(ts("2026-01-15T00:00:00"))) == "2026-01-15T08:00:00+00:00"
    assert iso(paris.next_after(ts("2026-07-15T00:00:00"))) == "2026-07-15T07:00:00+00:00"
    prefixed = parse_schedule("CRON_TZ=America/New_York 0 9 * * *")
    assert iso(prefixed.next_after(ts("2026-01-15T00:00:00"))) == "2026-01-15T14:00:00+00:00"


def test_spring_forward_fires_at_the_first_valid_instant() -> None:
    schedule = parse_schedule("30 2 * * *", "Europe/Paris")
    slot = schedule.next_after(ts("2026-03-29T00:00:00", "Europe/Paris"))
    assert slot < ts("2026-03-30T00:00:00", "Europe/Paris")  # not skipped for a day


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty schedule"),
        (" ; ", "empty schedule"),
        ("* * * *", "expected 5 fields"),
        ("* * * * * * *", "expected 5 fields"),
        ("61 * * * *", "not a valid cron expression"),
        ("@reboot", "unknown descriptor"),
        ("@every soon", "@every 'soon'"),
        ("CRON_TZ=Mars/Olympus 0 * * * *", "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_bad_schedules_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(ScheduleError, match=fragment):
        parse_schedule(text)


def test_unknown_timezone() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Nowhere/Land'"):
        parse_schedule("* * * * *", "Nowhere/Land")


def test_recent_slots_for_catch_up() -> None:
    schedule = parse_schedule("*/10 * * * *")
    last, now = ts("2026-01-01T10:00:00"), ts("2026-01-01T10:45:00")
    assert catch_up_slots(schedule, last, now, "none", 10) == []
    assert catch_up_slots(schedule, None, now, "all", 10) == []  # never fired: nothing missed
    assert [iso(s) for s in catch_up_slots(schedule, last, now, "last", 10)] == ["2026-01-01T10:40:00+00:00"]
    assert [iso(s)[11:16] for s in catch_up_slots(schedule, last, now, "all", 10)] == [
        "10:10",
        "10:20",
        "10:30",
        "10:40",
    ]
    assert [iso(s)[11:16] for s in catch_up_slots(schedule, last, now, "all", 2)] == ["10:30", "10:40"]
    every = parse_schedule("@every 15m; 5 10 * * *")
    assert [iso(s)[11:16] for s in catch_up_slots(every, last, now, "all", 10)] == [
        "10:05",
        "10:15",
        "10:30",
        "10:45",
    ]


def test_timeline_fires_each_slot_once_in_order_and_follows_changes() -> None:
    timeline = Timeline(lambda _f: 0.0)
    start = ts("2026-01-01T10:00:00")
    timeline.put("a", parse_schedule("@every 1s"), start)
    timeline.put("b", parse_schedule("@every 2s"), start)
    assert timeline.next_due() == start + 1
    # A late wake-up fires every slot it passed, none twice.
    due = timeline.pop_due(start + 4.5)
    assert sorted((d.function, d.slot - start) for d in due) == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("a", 4),
        ("b", 2),
        ("b", 4),
    ]
    assert timeline.pop_due(start + 4.5) == []
    timeline.put("a", parse_schedule("@every 10s"), start + 4.5)  # changed
    timeline.remove("b")
    assert [(d.function, d.slot - start) for d in timeline.pop_due(start + 10)] == [("a", 10)]
    assert timeline.functions == frozenset({"a"})
    timeline.remove("a")
    assert timeline.next_due() is None


def test_jitter_delays_the_fire_not_the_slot() -> None:
    timeline = Timeline(lambda _f: 5.0, random.Random(7))
    start = ts("2026-01-01T10:00:00")
    timeline.put("a", parse_schedule("@every 60s"), start)
    due_at = timeline.next_due()
    assert due_at is not None and start + 60 <= due_at <= start + 65
    (fire,) = timeline.pop_due(due_at)
    assert fire.slot == start + 60 and fire.due_at == due_at


def test_policy_annotations_override_defaults_and_report_bad_values() -> None:
    reports: list[tuple[str, str, str]] = []
    policy = Policy().overridden(
        {"concurrency": "Forbid", "catch_up": "all", "max_catch_up": "3", "jitter": "2s", "catch_up_x": "1"},
        lambda *args: reports.append(args),
    )
    assert policy == Policy("forbid", "all", 3, 2.0)
    assert [r[0] for r in reports] == ["catch_up_x"]
    bad = Policy().overridden({"max_catch_up": "0"}, lambda *args: reports.append(args))
    assert bad == Policy() and reports[-1] == ("max_catch_up", "0", "expected a positive integer")


async def test_local_store_claims_a_slot_once() -> None:
    store = LocalStore()
    assert await store.last_fired("f") is None
    assert (await store.claim("f", 10.0)).won
    assert not (await store.claim("f", 10.0)).won
    assert not (await store.claim("f", 5.0)).won
    assert (await store.claim("f", 11.0)).won
    assert await store.last_fired("f") == 11.0


def test_store_keys_escape_what_nats_refuses() -> None:
    assert store_key("fn.openfaas-fn") == "fn.openfaas-fn"
    assert store_key("a b*c") == "a=20b=2Ac"


def test_scheduled_time_is_iso_utc() -> None:
    from fastconn.sources.cron import message_id, scheduled_time

    t = datetime(2026, 1, 1, 10, 0, 5, tzinfo=UTC).timestamp()
    assert scheduled_time(t) == "2026-01-01T10:00:05Z"
    assert message_id("fn.ns", t) == "cron:fn.ns:2026-01-01T10:00:05Z"
