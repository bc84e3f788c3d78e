"""Asynchronous invocations: ``/async-function/<name>``, callbacks, and settling the source
only when the function really finished.

OpenFaaS answers an async call with 202 at once and POSTs the result later to the caller's
``X-Callback-Url``. Every connector today acknowledges its source on the 202, so a call that
fails later is lost. Here:

* A message that routes to at least one async function is split into one targeted call per
  function (``Message.function``), so each async call carries its own ``X-Call-Id`` and
  ``X-Callback-Url: <public_url>/callback/<token>``, where the token is an HMAC of the call id:
  a forged or stray callback is refused without any lookup.
* With ``ack = "on_callback"`` (the default) the message's :class:`~fastconn.message.Outcome`
  is produced once every function has a final result: sync calls when they answer, async calls
  when their callback arrives. A non-2xx callback, a non-202 answer from ``/async-function/`` or
  no callback within ``callback_timeout`` is handled like a failed sync call: re-invoked with
  backoff up to ``max_attempts``, then reported as RETRY (retryable) or FAILED, so the source
  redelivers or dead-letters it.
* With ``ack = "on_accept"`` the 202 settles the call, as OpenFaaS connectors do (still, only a
  202 counts: any other answer from ``/async-function/`` is a failed call).
* Pending calls are bounded by ``max_pending_callbacks``: when full, new async invocations wait,
  which is backpressure to the source like any other.
* Every (message, function) settles exactly once: a callback *claims* its call (removes it from
  the table of expected calls) before anything awaits, so concurrent duplicates, a late callback
  racing the timeout sweep, or a retried callback after a re-invocation cannot settle it twice.
  In the daemon the table is the core's (:meth:`Callbacks.use_core`, ``ingress.add_callbacks``):
  calls are registered there in batches *before* they are sent (a callback can beat the 202),
  the ingress answers ``/callback/<token>`` itself (token, claim, body limit: 401 / 400 / 404 /
  409 / 413 / 200), the timeout sweep and every other "this call gets no callback" claim
  through the same table (``callbacks_forget`` says which calls it took), and the claimed
  callbacks reach :meth:`Callbacks.on_callbacks` in batches, whose outcomes are delivered to
  each source at once. Without the core (a bare dispatcher with :meth:`register_routes`), the
  pending map here is the table and :meth:`handle` serves the route.
* Key ordering: a message with an ordering key first takes a *lease* on the key in the core (it
  waits behind the key's earlier messages like any message), then all its calls run holding the
  key, and the key is released only when the message settles, i.e. after the last callback. An
  async function's 202 does not let the key's next message start. The composite outcome's
  ``key_held`` says whether the key stays held for the source (its own ``hold_key_on_*`` flags).

This layer sits *on top of* the dispatcher and uses only its public interface
(:class:`CallTransport`); it does not import the dispatcher.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import itertools
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fastconn import _core
from fastconn.backoff import doubling
from fastconn.http_routes import HttpRequest, HttpResponse, Route, add_to_aiohttp
from fastconn.message import ErrorKind, Message, Outcome, OutcomeCallback, TargetResult, Verdict

__all__ = ["AckMode", "CallTransport", "CallbackMetrics", "CallbackSettings", "Callbacks"]

log = logging.getLogger("fastconn.callbacks")

AckMode = Literal["on_callback", "on_accept"]

# Callback headers set by the OpenFaaS gateway (queue worker).
_CALL_ID = "X-Call-Id"
_CALLBACK_URL = "X-Callback-Url"
_STATUS = "X-Function-Status"
_CALLBACK_PATH = "/callback/"
_CLAIMED = frozenset({"settled", "too_large"})
"""Outcomes of a callback record (:meth:`Callbacks.on_callbacks`) whose call the core claimed."""
CallbackRecord = tuple[str, str, int, tuple[tuple[str, str], ...], bytes]
"""A callback the core's ingress answered: (call_id, outcome, status, headers, body)."""
_SETTLED_MEMORY = 65536
"""Recently settled call ids remembered to answer duplicates with 409 rather than 404."""


Spawn = Callable[[str, Callable[[], Coroutine[Any, Any, None]]], "asyncio.Task[None]"]
"""Starts a named background job (``fastconn.supervise.Supervisor.spawn``)."""


class CallTransport(Protocol):
    """What the async layer needs from the dispatcher below it."""

    async def reserve(self, n: int) -> None: ...

    def submit_reserved(
        self, messages: Sequence[Message], on_outcomes: OutcomeCallback, *, capture: bool, observe: bool
    ) -> None: ...

    def release_capacity(self, n: int) -> None: ...

    def release_key(self, key: bytes) -> bool: ...

    def deliver_final(self, callback: OutcomeCallback, outcomes: list[Outcome]) -> None: ...


@dataclass(frozen=True, slots=True)
class CallbackSettings:
    public_url: str
    """Base URL the gateway reaches fastconn's admin server at."""
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    timeout: float = 600.0
    max_pending: int = 10_000
    ack: AckMode = "on_callback"
    max_attempts: int = 5
    retry_on: tuple[int, ...] = (408, 429, 500, 502, 503, 504)
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest callback body (a function's async result) accepted; a larger one settles its
    call as a failure (status 413) at once."""


class CallbackMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry when none is given: embedding apps keep their default one clean.
        r = registry if registry is not None else CollectorRegistry()
        self.callbacks = Counter(
            "fastconn_callbacks", "Async callbacks received", ["function", "status"], registry=r
        )
        self.latency = Histogram(
            "fastconn_callback_latency_seconds",
            "From async invocation to its callback",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
            registry=r,
        )
        self.pending = Gauge(
            "fastconn_pending_callbacks", "Async calls waiting for their callback", registry=r
        )
        self.rejected = Counter("fastconn_callback_rejected", "Callbacks refused", ["reason"], registry=r)
        self._received: dict[tuple[str, int], Any] = {}

    def received(self, function: str, status: int) -> Any:
        """The labelled callback counter, looked up once per (function, status): ``labels()``
        costs microseconds and this runs per callback."""
        child = self._received.get((function, status))
        if child is None:
            child = self._received[(function, status)] = self.callbacks.labels(
                function=function, status=str(status)
            )
        return child


@dataclass(slots=True, eq=False)
class _Composite:
    """One source message split into targeted calls; settles when every function has its final
    result, exactly once per function."""

    message: Message
    message_id: str
    callback: OutcomeCallback
    functions: tuple[str, ...]
    async_functions: frozenset[str]
    capture: bool
    owns_key: bool = False
    """The layer holds the message's ordering key in the core (a lease, or the source resumed a
    key held for this message) and must release it, or report it held, when settling."""
    results: dict[str, TargetResult | None] = field(default_factory=dict)
    in_core: int = 0
    """Calls handed to the core whose completion has not been drained yet. A callback can arrive
    before the core has finished with the call's 202; the key it holds is released (and the
    message settled) only once the core is done with every call."""
    settled: bool = False


@dataclass(slots=True, eq=False)
class _Lease:
    """The key lease of a composite: its calls start when the core grants the key."""

    composite: _Composite


@dataclass(slots=True, eq=False)
class _SyncCall:
    composite: _Composite
    function: str


@dataclass(slots=True, eq=False)
class _Call:
    """One async invocation of one function for one message."""

    composite: _Composite
    function: str
    call_id: str
    invocation: int
    invoked_at: float
    deadline: float


def _verdict(result: TargetResult, retry_on: tuple[int, ...]) -> Verdict:
    if result.ok:
        return Verdict.OK
    if result.error in (ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.IO) or result.status in retry_on:
        return Verdict.RETRY
    return Verdict.FAILED


# Severity as in the core: RETRY outranks FAILED (redelivery keeps every function's chance).
_SEVERITY = {Verdict.OK: 0, Verdict.UNROUTED: 1, Verdict.FAILED: 2, Verdict.RETRY: 3}


class Callbacks:
    """Splits async messages into calls, tracks pending calls, receives callbacks."""

    def __init__(
        self, transport: CallTransport, settings: CallbackSettings, metrics: CallbackMetrics | None = None
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.metrics = metrics or CallbackMetrics()
        self._calls: dict[str, _Call] = {}
        self._settled: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Call ids whose callback body is being read by the aiohttp route (register_routes).
        self._receiving: collections.Counter[str] = collections.Counter()
        self._receiving_probe: Callable[[list[str]], list[bool]] | None = lambda ids: [
            i in self._receiving for i in ids
        ]
        """Calls claimed by a callback whose body is still arriving."""
        self._pending_free = settings.max_pending
        self._pending_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._spawn: Spawn | None = None
        # Read at scrape time: a gauge set per call costs more than the rest of its bookkeeping.
        self.metrics.pending.set_function(lambda: len(self._calls))
        self._core: _core.Runtime | None = None
        """The core's table of expected calls, once the ingress serves the callbacks."""
        self._batch: dict[OutcomeCallback, list[Outcome]] | None = None
        """Outcomes settled while a batch of callbacks is handled, delivered together."""

    # -- lifecycle -------------------------------------------------------------------------

    def supervise_with(self, spawn: Spawn) -> None:
        """Runs the timeout sweep through ``spawn`` (e.g. ``Supervisor.spawn``), which restarts
        it should it die, instead of as a plain task. Call before ``start``."""
        self._spawn = spawn

    def start(self) -> None:
        if self._sweeper is None:
            if self._spawn is not None:
                self._sweeper = self._spawn("callbacks.sweep", self._sweep)
            else:
                self._sweeper = asyncio.get_running_loop().create_task(
                    self._sweep(), name="fastconn-callbacks"
                )

    async def stop(self) -> None:
        tasks = [t for t in (self._sweeper, *self._retry_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sweeper = None

    @property
    def sweeper(self) -> asyncio.Task[None] | None:
        """The timeout sweep task (for supervision)."""
        return self._sweeper

    @property
    def pending(self) -> int:
        return len(self._calls)

    def route(self) -> Route:
        """``POST /callback/<token>``: the body is read (within ``max_callback_bytes``) before
        the handler runs; a larger one reaches it unread, so its call fails at once."""
        return Route(
            "POST",
            _CALLBACK_PATH,
            self.handle,
            max_body_bytes=self.settings.max_body_bytes,
            name="callbacks",
            prefix=True,
            oversized_to_handler=True,
        )

    def register_routes(self, app: web.Application) -> None:
        """Serves the callback route on an aiohttp application (tests, a bare dispatcher)."""
        add_to_aiohttp(app, self.route(), track_header=_CALL_ID, receiving=self._receiving)

    @property
    def receiving_probe(self) -> Callable[[list[str]], list[bool]] | None:
        """Which of the given call ids have a callback arriving right now (the server's view:
        its body is being read); the sweep does not time those out."""
        return self._receiving_probe

    @receiving_probe.setter
    def receiving_probe(self, probe: Callable[[list[str]], list[bool]] | None) -> None:
        self._receiving_probe = probe

    def use_core(self, runtime: _core.Runtime) -> None:
        """Claims calls in the core's table from now on (the ingress serves ``/callback/``
        there, token check and claim included): the calls pending already are expected there
        too, so none is missed."""
        runtime.callbacks_setup(self.settings.secret, _SETTLED_MEMORY)
        if self._calls:
            runtime.callbacks_expect(list(self._calls))
        self._core = runtime
        # The core knows which calls have a callback arriving (forget skips them).
        self._receiving_probe = None

    # -- tokens ----------------------------------------------------------------------------

    def token(self, call_id: str) -> str:
        # One-shot digest: several times cheaper than an hmac object per call.
        return hmac.digest(self.settings.secret, call_id.encode(), "sha256")[:20].hex()

    @property
    def _callback_base(self) -> str:
        return f"{self.settings.public_url.rstrip('/')}{_CALLBACK_PATH}"

    def callback_url(self, call_id: str) -> str:
        return self._callback_base + self.token(call_id)

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self,
        messages: Sequence[Message],
        routes: Sequence[Sequence[str]],
        async_sets: Sequence[frozenset[str]],
        on_outcomes: OutcomeCallback,
        capture: bool,
    ) -> None:
        """Submits messages whose routes include async functions, one targeted call each (after
        a key lease for messages with an ordering key).

        Calls go out as pending capacity frees up, not when the whole batch fits: a batch
        larger than the free room starts with what fits and continues as callbacks arrive.
        """
        holds = self.settings.ack == "on_callback"
        out: list[Message] = []
        for message, functions, async_functions in zip(messages, routes, async_sets, strict=True):
            need = len(async_functions) if holds else 0
            if need > self._pending_free and out:
                self._send(out, capture)
                out = []
            await self._acquire_pending(need)
            leased = message.key is not None and not message.resume
            try:
                # Room for the lease now and for the calls when it is granted: the calls never
                # wait for room while the key they hold blocks the key's later messages.
                await self.transport.reserve(len(functions) + (1 if leased else 0))
            except BaseException:
                self._release_pending(need)
                if out:
                    with contextlib.suppress(Exception):
                        self._send(out, capture)
                raise
            composite = _Composite(
                message,
                message.message_id or _new_id(),
                on_outcomes,
                tuple(functions),
                async_functions,
                capture,
            )
            if leased:
                out.append(self._lease_message(composite))
            else:
                composite.owns_key = message.key is not None  # resumed: the key is held for it
                out.extend(self._calls_for(composite))
        if out:
            self._send(out, capture)

    def _send(self, messages: list[Message], capture: bool) -> None:
        """Submits prepared leases and calls, whose room (and that of the calls each lease will
        start) is reserved."""
        self._expect(messages)
        self.transport.submit_reserved(messages, self._on_call_outcomes, capture=capture, observe=False)

    def _expect(self, messages: Sequence[Message]) -> None:
        """Tells the core of the calls about to be sent, in one crossing (a callback can arrive
        before the call's 202 is drained); the core returns their tokens, which complete each
        call's ``X-Callback-Url`` (an HMAC per call costs Python more than the crossing)."""
        if self._core is None:
            return
        calls = [m for m in messages if isinstance(m.handle, _Call)]
        if not calls:
            return
        tokens = self._core.callbacks_expect([_call_id(m) for m in calls])
        base = self._callback_base
        for m, token in zip(calls, tokens, strict=True):
            own = m.own_headers
            assert isinstance(own, list)  # built by _targeted, with the URL left to fill in
            own[1] = (_CALLBACK_URL, base + token)

    def _lease_message(self, composite: _Composite) -> Message:
        m = composite.message
        return Message(
            m.topic, b"", message_id=composite.message_id, key=m.key, lease=True, handle=_Lease(composite)
        )

    def _calls_for(self, composite: _Composite) -> list[Message]:
        return [
            self._targeted(composite, function, function in composite.async_functions, 1)
            for function in composite.functions
        ]

    def _targeted(self, composite: _Composite, function: str, asynchronous: bool, invocation: int) -> Message:
        m = composite.message
        own: list[tuple[str, str]] = []
        handle: _SyncCall | _Call = _SyncCall(composite, function)
        if asynchronous and self.settings.ack == "on_callback":
            call_id = _new_id()
            now = time.monotonic()
            call = _Call(composite, function, call_id, invocation, now, now + self.settings.timeout)
            self._calls[call_id] = call
            # With the core's table, the token comes back from _expect, in one batch.
            url = "" if self._core is not None else self.callback_url(call_id)
            own = [(_CALL_ID, call_id), (_CALLBACK_URL, url)]
            handle = call
        held = composite.owns_key
        composite.in_core += 1
        # Built field by field rather than with dataclasses.replace, which costs several times
        # more: this runs once per function per message.
        return Message(
            m.topic,
            m.payload,
            m.headers,
            composite.message_id,
            # The composite holds the key: every call runs inside it and leaves it held.
            m.key if held else None,
            m.delivery_attempt + invocation - 1,
            hold_key_on_retry=False,
            hold_key_on_failure=False,
            resume=held,
            function=function,
            asynchronous=asynchronous,
            keep_key=held,
            lease=False,
            own_headers=own,
            handle=handle,
        )

    # -- outcomes of the leases and targeted calls -------------------------------------------

    def _on_call_outcomes(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            handle = outcome.message.handle
            if isinstance(handle, _Call):
                handle.composite.in_core -= 1
                # Accepted (202, the common case): the call waits for its callback, and no
                # result object is needed.
                if outcome.first_status() != 202:
                    self._on_async_answer(handle, outcome.results[0] if outcome.results else None)
                self._settle_if_done(handle.composite)
                continue
            result = outcome.results[0] if outcome.results else None
            if isinstance(handle, _SyncCall):
                handle.composite.in_core -= 1
                if result is not None and outcome.message.asynchronous:
                    # ack = on_accept: the 202 settles the call, and only a 202 counts.
                    result = self._accepted_result(result)
                # result None: the function left the table between routing and the call.
                self._finish(handle.composite, handle.function, result)
            elif isinstance(handle, _Lease):
                self._on_lease(handle.composite, outcome)

    def _on_lease(self, composite: _Composite, outcome: Outcome) -> None:
        composite.owns_key = outcome.key_held
        calls = self._calls_for(composite)
        try:
            self._expect(calls)
            self.transport.submit_reserved(
                calls, self._on_call_outcomes, capture=composite.capture, observe=False
            )
        except Exception as exc:  # closing: nothing was called, the source keeps the message
            log.warning("could not start the calls of message %s: %s", composite.message_id, exc)
            composite.in_core -= len(calls)
            for call in calls:
                if isinstance(call.handle, _Call):
                    self._forget(call.handle.call_id)
                failed = TargetResult(call.function or "", 0, ErrorKind.CONNECT, 0, 0.0)
                self._finish(composite, call.function or "", failed)

    @staticmethod
    def _accepted_result(result: TargetResult) -> TargetResult:
        if result.status in {202, 0}:
            return result
        # A 2xx other than 202 from /async-function/ is not an acceptance: fail the call.
        status = result.status if not result.ok else 502
        return dataclasses.replace(result, status=status)

    def _on_async_answer(self, call: _Call, result: TargetResult | None) -> None:
        if self._calls.get(call.call_id) is not call:
            return  # the callback (or the sweep) got there before the 202 was drained
        if result is not None and result.status == 202:
            return  # accepted: the call waits for its callback
        # No acceptance: the invocation itself failed (or the function left the table).
        if not self._forget(call.call_id):
            return  # a callback claimed it meanwhile: it settles the call
        if result is None:
            self._finish(call.composite, call.function, None)
            return
        failed = result if not result.ok else dataclasses.replace(result, status=502)
        self._retry_or_finish(call, failed)

    # -- callbacks ---------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        call_id = request.header(_CALL_ID) or ""
        token = request.path[len(_CALLBACK_PATH) :]
        # Call ids are ASCII (uuid hex); anything else, even undecodable bytes, is not ours.
        if (
            not call_id
            or not call_id.isascii()
            or not token.isascii()
            or not hmac.compare_digest(token.encode(), self.token(call_id).encode())
        ):
            self.metrics.rejected.labels(reason="bad_token").inc()
            return _json(401, {"error": "bad callback token"})
        try:
            status = int(request.header(_STATUS) or "")
        except ValueError:
            self.metrics.rejected.labels(reason="bad_request").inc()
            return _json(400, {"error": f"missing or invalid {_STATUS}"})
        # Claim the call before anything else: the body is already read, nothing awaits from here
        # on, so a concurrent duplicate (a retrying gateway, a proxy) or the timeout sweep finds
        # it gone and cannot settle it a second time.
        call, reason = self._claim(call_id)
        if call is None:
            self.metrics.rejected.labels(reason=reason).inc()
            return _json(409 if reason == "duplicate" else 404, {"error": f"{reason} call id {call_id}"})
        self._settle_call(call)
        latency = time.monotonic() - call.invoked_at
        headers = tuple(request.headers)
        if request.body_too_large:
            return self._too_large(call, latency, headers)
        self.metrics.received(call.function, status).inc()
        self.metrics.latency.observe(latency)
        result = TargetResult(
            call.function, status, ErrorKind.NONE, call.invocation, latency, None, request.body, headers
        )
        if result.ok:
            self._finish(call.composite, call.function, result)
        else:
            self._retry_or_finish(call, result)
        return _json(200, {"status": "settled"})

    def _claim(self, call_id: str) -> tuple[_Call | None, str]:
        """Takes the call out of the pending map (and the core's table): the call, or why not
        ("duplicate", "unknown")."""
        if self._core is not None:
            code = self._core.callbacks_claim(call_id)
            if code:
                return None, "duplicate" if code == 1 else "unknown"
        call = self._calls.pop(call_id, None)
        if call is None:
            return None, "duplicate" if call_id in self._settled else "unknown"
        return call, ""

    def on_callbacks(self, records: Sequence[CallbackRecord]) -> None:
        """A batch of callbacks the core's ingress answered: (call_id, outcome, status, headers,
        body), outcome "settled" or "too_large" for a call the core claimed (exactly once), or
        "refused": the core counted refused callbacks (by reason) for the metrics to take. The
        outcomes settled go to each source in one delivery."""
        batch: dict[OutcomeCallback, list[Outcome]] = {}
        self._batch = batch
        try:
            now = time.monotonic()
            metrics = self.metrics
            counted: collections.Counter[tuple[str, int]] = collections.Counter()
            refused = False
            for call_id, outcome, status, headers, body in records:
                if outcome not in _CLAIMED:
                    refused = True
                    continue
                call = self._calls.pop(call_id, None)
                if call is None:
                    log.error("a callback for call %s the core claimed but nobody waits for (a bug)", call_id)
                    continue
                self._settle_call(call)
                latency = now - call.invoked_at
                if outcome == "too_large":
                    self._too_large(call, latency, headers)
                    continue
                counted[(call.function, status)] += 1
                metrics.latency.observe(latency)
                result = TargetResult(
                    call.function, status, ErrorKind.NONE, call.invocation, latency, None, body, headers
                )
                if result.ok:
                    self._finish(call.composite, call.function, result)
                else:
                    self._retry_or_finish(call, result)
            # One increment per (function, status) of the batch: each costs a lock.
            for (function, status), n in counted.items():
                metrics.received(function, status).inc(n)
            if refused and self._core is not None:
                for reason, n in self._core.callbacks_refused():
                    metrics.rejected.labels(reason=reason).inc(n)
        finally:
            self._batch = None
            for callback, outcomes in batch.items():
                self.transport.deliver_final(callback, outcomes)

    def _too_large(self, call: _Call, latency: float, headers: tuple[tuple[str, str], ...]) -> HttpResponse:
        """The result cannot be read: the call fails for good now (re-invoking would produce the
        same result), rather than waiting for its timeout."""
        limit = self.settings.max_body_bytes
        reason = (
            f"the callback body of {call.function} exceeds [dispatch] max_callback_bytes ({limit} bytes); "
            "the result was not read: raise max_callback_bytes or make the function return less"
        )
        log.warning("call %s: %s", call.call_id, reason)
        self.metrics.rejected.labels(reason="too_large").inc()
        result = TargetResult(
            call.function, 413, ErrorKind.NONE, call.invocation, latency, None, reason.encode(), headers
        )
        self._finish(call.composite, call.function, result)
        return _json(413, {"error": reason})

    # -- settling ----------------------------------------------------------------------------

    def _retry_or_finish(self, call: _Call, result: TargetResult) -> None:
        s = self.settings
        if _verdict(result, s.retry_on) is Verdict.RETRY and call.invocation < s.max_attempts:
            delay = random.uniform(0, doubling(call.invocation, s.backoff_initial, s.backoff_max))
            task = asyncio.get_running_loop().create_task(self._reinvoke(call, delay))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        self._finish(call.composite, call.function, result)

    async def _reinvoke(self, call: _Call, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._acquire_pending(1)
        # A re-invocation of a keyed message runs inside the key the composite holds (resume):
        # it never queues behind the key it is itself blocking.
        message = self._targeted(call.composite, call.function, True, call.invocation + 1)
        try:
            await self.transport.reserve(1)
            self._expect([message])
            self.transport.submit_reserved([message], self._on_call_outcomes, capture=False, observe=False)
        except Exception as exc:  # closing: report the call as still retryable
            log.warning("could not re-invoke %s: %s", call.function, exc)
            call.composite.in_core -= 1
            if isinstance(message.handle, _Call):
                self._forget(message.handle.call_id)
            failed = TargetResult(call.function, 0, ErrorKind.CONNECT, call.invocation, 0.0)
            self._finish(call.composite, call.function, failed)

    def _forget(self, call_id: str) -> bool:
        """Takes a call back (it will get no callback); False when a callback has claimed it
        (or is arriving), which then settles it."""
        if self._core is not None and not self._core.callbacks_forget([call_id])[0]:
            return False
        call = self._calls.pop(call_id, None)
        if call is not None:
            self._settle_call(call)
        return True

    def _settle_call(self, call: _Call) -> None:
        """A claimed call is done waiting: remember its id (409 for late duplicates) and free
        its pending slot."""
        if self._core is None:  # else the core remembers
            self._settled[call.call_id] = None
            if len(self._settled) > _SETTLED_MEMORY:
                self._settled.popitem(last=False)
        self._release_pending(1)

    def _finish(self, composite: _Composite, function: str, result: TargetResult | None) -> None:
        """Records ``function``'s final result; idempotent per (message, function)."""
        if composite.settled or function in composite.results:
            log.debug("ignored a second final result of %s for %s", function, composite.message_id)
            return
        composite.results[function] = result
        self._settle_if_done(composite)

    def _settle_if_done(self, composite: _Composite) -> None:
        """Settles the message once every function has its final result and the core is done
        with every call (so the key it holds is really held)."""
        if composite.settled or composite.in_core or len(composite.results) < len(composite.functions):
            return
        composite.settled = True
        results = [r for r in composite.results.values() if r is not None]
        verdicts = [_verdict(r, self.settings.retry_on) for r in results]
        verdict = max(verdicts, key=_SEVERITY.__getitem__, default=Verdict.UNROUTED)
        m = composite.message
        key_held = False
        if composite.owns_key and m.key is not None:
            key_held = (m.hold_key_on_retry and verdict is Verdict.RETRY) or (
                m.hold_key_on_failure and verdict is Verdict.FAILED
            )
            if not key_held and not self.transport.release_key(m.key):
                log.error("the key of message %s was not held when it settled (a bug)", composite.message_id)
        outcome = Outcome(m, verdict, composite.message_id, tuple(results), key_held=key_held)
        if self._batch is not None:
            self._batch.setdefault(composite.callback, []).append(outcome)
        else:
            self.transport.deliver_final(composite.callback, [outcome])

    # -- timeouts ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        interval = max(0.01, min(1.0, self.settings.timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            expired = [c for c in self._calls.values() if c.deadline <= now]
            if expired and self._core is not None:
                # Claimed in the core, exactly as a callback is: one arriving or claimed already
                # (its record not drained yet) is not taken, and settles the call itself.
                taken = self._core.callbacks_forget([c.call_id for c in expired])
                expired = [c for c, mine in zip(expired, taken, strict=True) if mine]
            elif expired and self._receiving_probe is not None:
                # A callback whose body is still arriving settles its call itself.
                arriving = self._receiving_probe([c.call_id for c in expired])
                expired = [c for c, busy in zip(expired, arriving, strict=True) if not busy]
            for call in expired:
                if self._calls.get(call.call_id) is not call:
                    continue  # claimed meanwhile
                log.warning(
                    "no callback for %s (call %s) within %.1fs",
                    call.function,
                    call.call_id,
                    self.settings.timeout,
                )
                self.metrics.rejected.labels(reason="timeout").inc()
                self._calls.pop(call.call_id, None)
                self._settle_call(call)
                result = TargetResult(
                    call.function, 0, ErrorKind.TIMEOUT, call.invocation, now - call.invoked_at
                )
                self._retry_or_finish(call, result)

    # -- the pending bound ---------------------------------------------------------------------

    async def _acquire_pending(self, n: int) -> None:
        if n > self._pending_free:
            # Full: wait for some room beyond what this call needs, so the calls that follow
            # cross into the core as a batch rather than one per callback.
            limit = self.settings.max_pending
            want = min(limit, n + max(1, limit // 8))
            while self._pending_free < want:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._pending_waiters.append(future)
                await future
        self._pending_free -= n

    def _release_pending(self, n: int) -> None:
        self._pending_free += n
        while self._pending_waiters:
            waiter = self._pending_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


def _call_id(message: Message) -> str:
    handle = message.handle
    assert isinstance(handle, _Call)
    return handle.call_id


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id() -> str:
    """A process-unique id (32 hex digits): a random prefix drawn once per process, then a
    counter. Nothing trusts it to be unguessable (a callback's token is an HMAC of it), and
    a random draw per call was a tenth of the async path's CPU."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _json(status: int, body: dict[str, str]) -> HttpResponse:
    return HttpResponse(
        status, (("Content-Type", "application/json; charset=utf-8"),), json.dumps(body).encode()
    )
