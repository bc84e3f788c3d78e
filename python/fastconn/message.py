"""The plain data that crosses the bridge: messages in, outcomes out.

A source turns whatever its broker delivers into :class:`Message` objects; the dispatcher
returns one :class:`Outcome` per message once *every* target function of that message has a
final result. Per-message failure is data (``verdict``), never an exception.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Verdict(enum.IntEnum):
    """What the source should do with a message. Values match the Rust core's encoding."""

    OK = 0
    """Every target answered 2xx: acknowledge."""
    RETRY = 1
    """A target failed with a retryable error after the dispatcher's own retries: keep the
    message (nak / don't commit) and redeliver later, after ``Outcome.retry_after`` if set."""
    FAILED = 2
    """A target failed for good (non-retryable status): dead-letter, then acknowledge."""
    UNROUTED = 3
    """No function subscribes to the topic: nothing to deliver, the message is done."""


class ErrorKind(enum.IntEnum):
    """Why a target call has no HTTP status. Values match the Rust core's encoding."""

    NONE = 0
    CONNECT = 1
    TIMEOUT = 2
    IO = 3
    """The connection broke mid-request or mid-response."""
    INVALID_REQUEST = 4
    """The request could not be built (bad URL, bad header)."""
    INTERNAL = 5
    """A bug in fastconn (a panicked task); reported rather than lost."""
    PROTOCOL = 6
    """The function's response broke HTTP/1.1 (malformed head, too many headers, invalid or
    conflicting framing). Final, not retried; the connection is closed and ``body`` says why."""
    TLS = 7
    """TLS failed: the server's certificate is not trusted, the server refused ours, or it does
    not speak TLS. Not retried (a configuration problem); the result's body says what failed."""

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True)
class Message:
    """One event to deliver. ``handle`` is the source's own reference (for ack/nack); the
    core never sees it."""

    topic: str
    payload: bytes
    headers: Sequence[tuple[str, str]] = ()
    message_id: str | None = None
    """Idempotency key sent as ``X-Message-Id``; stable across retries and redeliveries.
    Generated when ``None``."""
    key: bytes | None = None
    """Ordering key: messages with the same key are delivered one at a time, in order."""
    delivery_attempt: int = 1
    """Delivery count as the *source* sees it (redeliveries); the dispatcher adds its own
    retries on top when it sends ``X-Delivery-Attempt``."""
    hold_key_on_retry: bool = False
    """With a ``key``: a RETRY verdict keeps the key busy, so later messages of the key wait
    until this one is resubmitted with ``resume=True`` (or the key is released with
    ``Dispatcher.release_key``). Lets a source retry without reordering its key."""
    hold_key_on_failure: bool = False
    """Like ``hold_key_on_retry``, after a FAILED verdict: for a source that keeps retrying a
    message that failed for good (no dead-letter destination)."""
    resume: bool = False
    """This message's key is held for it by its earlier RETRY (or FAILED): start at once."""
    function: str | None = None
    """Deliver only to this function (one of those the topic routes to): used to re-invoke a
    single function, e.g. after a failed async callback."""
    asynchronous: bool = False
    """Invoke through the functions' ``/async-function/`` form (sources ask for it with
    ``submit(..., asynchronous=True)``, which sets it for the whole batch)."""
    own_headers: Sequence[tuple[str, str]] = ()
    """Headers fastconn itself sets (``invoke``'s): sent as given and exempt from the
    reserved-name filter that ``headers`` go through. Sources leave it empty."""
    handle: Any = None


@dataclass(slots=True, frozen=True)
class TargetResult:
    """The final result of one message at one function."""

    function: str
    status: int
    """HTTP status of the last attempt, or 0 when there was none (see ``error``)."""
    error: ErrorKind
    attempts: int
    latency: float
    """Seconds from the first attempt's start to the final answer."""
    retry_after: float | None = None
    body: bytes | None = None
    """The response body when captured (``capture`` submits) or an excerpt on failure."""
    headers: tuple[tuple[str, str], ...] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def status_label(self) -> str:
        """The status as a metric label: the HTTP code, or the error kind."""
        return str(self.status) if self.status else self.error.label


_WireResult = tuple[str, int, int, int, float, "float | None", "bytes | None", "bytes | None"]
"""A result as the core drains it; headers packed as ``name\\0value\\0...`` (see
:func:`_unpack_headers`)."""
_ERROR_KINDS = tuple(ErrorKind)


def _result_from_wire(raw: _WireResult) -> TargetResult:
    fn, status, err, attempts, latency, retry_after, body, headers = raw
    return TargetResult(
        fn,
        status,
        _ERROR_KINDS[err],
        attempts,
        latency,
        retry_after,
        body,
        _unpack_headers(headers) if headers is not None else None,
    )


def _unpack_headers(packed: bytes) -> tuple[tuple[str, str], ...]:
    """The core's ``name\\0value\\0...`` as (name, value) pairs (HTTP allows no NUL in
    either, so the separator is unambiguous)."""
    if not packed:
        return ()
    parts = packed.decode("utf-8", "replace").split("\0")
    return tuple(zip(parts[0:-1:2], parts[1::2], strict=True))


class Outcome:
    """All targets of one message are settled: the worst result decides the verdict.

    Per-function :attr:`results` are built on first access: most sources only look at the
    verdict, and the per-function figures are already counted in the core's metrics.
    """

    __slots__ = ("_raw", "_results", "key_held", "message", "message_id", "verdict")

    message: Message
    verdict: Verdict
    message_id: str
    key_held: bool
    """Whether the core still holds this message's ordering key for it (``hold_key_on_retry``
    after RETRY, ``hold_key_on_failure`` after FAILED): the source must resubmit the message
    with ``resume=True`` or call ``Dispatcher.release_key``. Always false without a key. Sources
    read this; they never infer it from their own flags."""

    def __init__(
        self,
        message: Message,
        verdict: Verdict,
        message_id: str,
        results: tuple[TargetResult, ...] = (),
        *,
        key_held: bool = False,
    ) -> None:
        self.message = message
        self.verdict = verdict
        self.message_id = message_id
        self.key_held = key_held
        self._results: tuple[TargetResult, ...] | None = tuple(results)
        self._raw: Sequence[_WireResult] = ()

    @classmethod
    def _from_wire(
        cls,
        message: Message,
        verdict: Verdict,
        message_id: str,
        raw: Sequence[_WireResult],
        key_held: bool,
    ) -> Outcome:
        outcome = cls.__new__(cls)
        outcome.message = message
        outcome.verdict = verdict
        outcome.message_id = message_id
        outcome.key_held = key_held
        outcome._results = None
        outcome._raw = raw
        return outcome

    @property
    def results(self) -> tuple[TargetResult, ...]:
        if self._results is None:
            self._results = tuple(_result_from_wire(r) for r in self._raw)
        return self._results

    def first_status(self) -> int | None:
        """The HTTP status of the first function's result (0: no answer), or None without
        results, without building the results (a hot path only needs the status)."""
        if self._results is not None:
            return self._results[0].status if self._results else None
        return self._raw[0][1] if self._raw else None

    @property
    def retry_after(self) -> float | None:
        """The largest ``Retry-After`` a function asked for, when the verdict is RETRY."""
        if self.verdict is not Verdict.RETRY:
            return None
        return max((r.retry_after for r in self.results if r.retry_after is not None), default=None)

    @property
    def ok(self) -> bool:
        return self.verdict in (Verdict.OK, Verdict.UNROUTED)

    def first_failure(self) -> TargetResult | None:
        return next((r for r in self.results if not r.ok), None)

    def __repr__(self) -> str:
        return (
            f"Outcome({self.message.topic!r}, {self.verdict.name}, id={self.message_id!r}, "
            f"key_held={self.key_held}, results={self.results!r})"
        )


OutcomeCallback = Callable[[list[Outcome]], None]
"""Called on the event loop with the outcomes of one batch that completed since the last
drain (possibly a part of the batch). Must not block."""
