"""The one backoff formula every source and supervisor uses: doubling from ``initial`` per
attempt, capped at ``maximum``."""

from __future__ import annotations

__all__ = ["doubling"]

_MAX_DOUBLINGS = 30
"""2**30 times any sane initial delay is far past any cap: stops the float from overflowing."""


def doubling(attempt: int, initial: float, maximum: float) -> float:
    """The wait before retry number ``attempt`` (1 = the first retry): ``initial`` for the
    first, doubling each time, never above ``maximum``. Attempts below 1 count as 1."""
    exponent = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return float(min(initial * 2**exponent, maximum))
