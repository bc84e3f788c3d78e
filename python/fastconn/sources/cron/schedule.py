"""Cron schedules as pure functions of time: parsing and the fire times ("slots") they produce.

A schedule is one or more expressions separated by ``;`` (the union of their slots):

* five fields (``*/5 * * * *``), or six with a leading seconds field (``*/10 * * * * *``, the
  robfig/cron ``WithSeconds`` order, as the 2020 OpenFaaS cron-connector accepted);
* descriptors ``@yearly`` ``@annually`` ``@monthly`` ``@weekly`` ``@daily`` ``@midnight`` ``@hourly``;
* ``@every <go duration>`` (``@every 30s``, ``@every 1h30m``), whole seconds, at least 1 s;
* an optional ``CRON_TZ=<zone>`` (or ``TZ=``) prefix per expression, as robfig/cron v3 honours.

Slots are Unix timestamps of whole seconds. Cron expressions are evaluated in the schedule's
time zone (croniter with tz-aware datetimes). ``@every`` slots are multiples of the interval since
the Unix epoch — unlike robfig/cron, which counts from the process start: replicas started at
different times must agree on the slots, or one fire per slot across replicas means nothing.
"""

from __future__ import annotations

import functools
import heapq
import math
import re
from datetime import datetime
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from fastconn.durations import parse_duration

__all__ = ["DEFAULT_TIMEZONE", "Schedule", "ScheduleError", "parse_every", "parse_schedule", "zone"]

DEFAULT_TIMEZONE: Final = "UTC"
_DESCRIPTORS: Final = frozenset(
    ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
)
_TZ_PREFIX: Final = re.compile(r"^(?:CRON_TZ|TZ)=(\S+)\s+(.*)$")


class ScheduleError(ValueError):
    """A schedule that cannot be parsed; the message names the expression and the fix."""


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`ScheduleError` when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Paris'"
        ) from None


def parse_every(text: str) -> int:
    """Seconds of a Go duration (``1h30m``, ``90s``): truncated to whole seconds, at least 1 (robfig)."""
    try:
        seconds = parse_duration(text.strip())
    except ValueError as exc:
        raise ScheduleError(
            f"@every {text.strip()!r}: expected a duration such as 30s, 5m or 1h30m ({exc})"
        ) from None
    return max(1, math.floor(seconds))


class _Expression(Protocol):
    def next_after(self, t: float) -> float: ...

    def recent(self, after: float, until: float, limit: int) -> list[float]:
        """Up to ``limit`` slots in ``(after, until]``, newest first."""
        ...


class _Every:
    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def next_after(self, t: float) -> float:
        return float((math.floor(t) // self.seconds + 1) * self.seconds)

    def recent(self, after: float, until: float, limit: int) -> list[float]:
        slots: list[float] = []
        slot = float(math.floor(until) // self.seconds * self.seconds)
        while slot > after and len(slots) < limit:
            slots.append(slot)
            slot -= self.seconds
        return slots


class _Cron:
    def __init__(self, expr: str, tz: ZoneInfo) -> None:
        fields = expr.split()
        if not (expr.startswith("@") or len(fields) in (5, 6)):
            raise ScheduleError(
                f"{expr!r}: expected 5 fields (minute hour day month weekday), 6 with a leading "
                f"seconds field, or a descriptor such as @hourly; got {len(fields)} fields"
            )
        self.expr = expr
        self.tz = tz
        self.seconds_first = len(fields) == 6
        try:
            self._iter = self._at(0.0)
        except (CroniterError, ValueError, KeyError) as exc:
            raise ScheduleError(f"{expr!r}: not a valid cron expression ({exc})") from None
        # The iterator stays positioned at the last slot returned: the steady state (next slot
        # after the one just fired) costs one step, not a new iterator.
        self._position: float | None = None
        # The last question and its answer: functions sharing an expression (see
        # _shared_cron) ask the same question in turn, and croniter costs ~50 us an answer.
        self._asked: tuple[float, float] | None = None

    def _at(self, t: float) -> croniter:
        start = datetime.fromtimestamp(t, self.tz)
        return croniter(self.expr, start, second_at_beginning=self.seconds_first)

    def next_after(self, t: float) -> float:
        if self._asked is not None and self._asked[0] == t:
            return self._asked[1]
        if self._position != t:
            self._iter = self._at(t)
        slot = float(self._iter.get_next(datetime).timestamp())
        self._position = slot
        self._asked = (t, slot)
        return slot

    def recent(self, after: float, until: float, limit: int) -> list[float]:
        # get_prev is strictly before its start: start one second later to include `until`.
        backwards = self._at(math.floor(until) + 1.0)
        slots: list[float] = []
        while len(slots) < limit:
            slot = float(backwards.get_prev(datetime).timestamp())
            if slot <= after:
                break
            slots.append(slot)
        return slots


class Schedule:
    """The parsed form of one ``schedule`` string (see the module docstring)."""

    def __init__(self, text: str, expressions: list[_Expression]) -> None:
        self.text = text
        self._expressions = expressions

    def next_after(self, t: float) -> float:
        """The first slot strictly after ``t``."""
        return min(expression.next_after(t) for expression in self._expressions)

    def recent(self, after: float, until: float, limit: int) -> list[float]:
        """Up to ``limit`` slots in ``(after, until]``, oldest first (for catch-up)."""
        if limit <= 0 or until <= after:
            return []
        runs = [expression.recent(after, until, limit) for expression in self._expressions]
        newest = heapq.merge(*runs, reverse=True)
        return sorted(set(heapq.nlargest(limit, set(newest))))


def parse_schedule(text: str, timezone: str = DEFAULT_TIMEZONE) -> Schedule:
    """Parse ``text`` in IANA zone ``timezone``; :class:`ScheduleError` names what is wrong."""
    default_zone = zone(timezone)
    parts = [part.strip() for part in text.split(";") if part.strip()]
    if not parts:
        raise ScheduleError("empty schedule: expected a cron expression such as '*/5 * * * *'")
    expressions: list[_Expression] = []
    for part in parts:
        tz, expr = default_zone, part
        prefixed = _TZ_PREFIX.match(part)
        if prefixed is not None:
            tz, expr = zone(prefixed.group(1)), prefixed.group(2).strip()
        expressions.append(_expression(expr, tz))
    return Schedule(text, expressions)


def _expression(expr: str, tz: ZoneInfo) -> _Expression:
    if expr.startswith("@every"):
        return _Every(parse_every(expr.removeprefix("@every")))
    if expr.startswith("@") and expr.lower() not in _DESCRIPTORS:
        known = ", ".join(sorted(_DESCRIPTORS))
        raise ScheduleError(f"{expr!r}: unknown descriptor; expected @every <duration> or one of {known}")
    return _shared_cron(expr.lower() if expr.startswith("@") else expr, tz)


@functools.lru_cache(maxsize=4096)
def _shared_cron(expr: str, tz: ZoneInfo) -> _Cron:
    """One evaluator per (expression, zone): many functions often share a schedule, and all of
    them then fire on the same slots, so one croniter step serves every one of them."""
    return _Cron(expr, tz)
