"""Duration parsing for configuration values.

Durations are written the way OpenFaaS (a Go project) writes them, so existing connector settings
such as ``upstream_timeout=1m30s`` carry over unchanged: Go ``time.ParseDuration`` syntax, plus plain
numbers meaning seconds (TOML ``timeout = 5`` or ``"0.5"``). Internally every duration is a ``float``
number of seconds, which is what asyncio and the dispatcher take.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Final

from pydantic import BeforeValidator

__all__ = ["MAX_DURATION", "Duration", "parse_duration"]

MAX_DURATION: Final = 24 * 86400.0
"""The longest duration any setting takes: 24 days. Durations end up in fixed-width fields:
Kafka's millisecond settings are 32-bit (2**31 ms is 24.8 days), the core's deadlines are
``Instant + Duration`` (which overflows on absurd values), event-loop timers are bounded too.
One cap below all of them lets ``check`` refuse what ``run`` could not use."""

# Seconds per Go duration unit. Both micro signs are accepted, as Go does: U+00B5 (MICRO SIGN, what
# a keyboard produces) and U+03BC (GREEK SMALL LETTER MU).
_UNITS: Final[dict[str, Decimal]] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "\u00b5s": Decimal("1e-6"),
    "\u03bcs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}

# One "<number><unit>" component; "ms" must precede "m" so "5ms" is not read as "5m" + garbage.
_COMPONENT: Final = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_GO_DURATION: Final = re.compile(rf"(?:{_COMPONENT})+")
_COMPONENT_RE: Final = re.compile(_COMPONENT)
_PLAIN_NUMBER: Final = re.compile(r"\d+(?:\.\d*)?|\.\d+")

_TOO_LONG: Final = f"too large: at most 24 days ({MAX_DURATION:.0f}s, '576h')"
_EXPECTED: Final = "expected a duration such as '30s', '1m30s', '100ms' or a non-negative number of seconds"


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` as a number of seconds.

    Accepts Go duration strings (``"30s"``, ``"1m30s"``, ``"1.5h"``, ``"250us"``, ``"10µs"``), ints and
    floats (seconds) and numeric strings (``"5"``, ``"0.5"``). Raises :class:`ValueError` naming the
    value for negative, non-finite or unparsable input.
    """
    try:
        return _parse(value)
    except ValueError as exc:
        raise ValueError(f"invalid duration {value!r}: {exc}") from None


def _parse(value: object) -> float:
    """Parse like :func:`parse_duration`; errors say only what is wrong, not the value."""
    # bool is an int subclass; ``timeout = true`` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(_EXPECTED)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float's range
            raise ValueError(_TOO_LONG) from None
        if not math.isfinite(seconds):
            raise ValueError(_EXPECTED)
        if seconds < 0:
            raise ValueError("must not be negative")
        return _bounded(seconds)

    text = value.strip()
    if text.startswith("-"):
        raise ValueError("must not be negative")
    # Go allows an explicit plus sign.
    text = text.removeprefix("+")
    if _PLAIN_NUMBER.fullmatch(text):
        total = Decimal(text)
    elif _GO_DURATION.fullmatch(text):
        total = sum(
            (Decimal(number) * _UNITS[unit] for number, unit in _COMPONENT_RE.findall(text)),
            start=Decimal(0),
        )
    else:
        raise ValueError(_EXPECTED)
    seconds = float(total)
    if not math.isfinite(seconds):
        raise ValueError(_TOO_LONG)
    return _bounded(seconds)


def _bounded(seconds: float) -> float:
    if seconds > MAX_DURATION:
        raise ValueError(_TOO_LONG)
    return seconds


def _validate_duration(value: object) -> float:
    # In a model the offending value is reported next to the message already (pydantic's "input"),
    # so the message here leaves it out.
    try:
        return _parse(value)
    except ValueError as exc:
        raise ValueError(f"invalid duration: {exc}") from None


Duration = Annotated[float, BeforeValidator(_validate_duration)]
"""A pydantic field type: a duration in the syntax :func:`parse_duration` accepts, stored as seconds."""
