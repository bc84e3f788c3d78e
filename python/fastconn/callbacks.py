"""Asynchronous invocations: ``/async-function/<name>``, callbacks, and settling the source
only when the function really finished.

OpenFaaS answers an async call with 202 at once and POSTs the result later to the caller's
``X-Callback-Url``. Every connector today acknowledges its source on the 202, so a call that
fails later is lost. Here the core owns each async call end to end (``fastconn_core::callbacks``):

* It posts the message to the function's ``/async-function/`` form with its own ``X-Call-Id``
  and ``X-Callback-Url: <public_url>/callback/<token>``, the token an HMAC of the call id, so a
  forged or stray callback is refused without any lookup.
* With ``ack = "on_callback"`` (the default), on the 202 the call gives its HTTP permits back
  and waits for its callback; the callback's ``X-Function-Status`` and body are the call's
  result. So a non-2xx callback, a non-202 answer from ``/async-function/`` or no callback
  within ``callback_timeout`` is a failed attempt like a failed sync call: re-invoked with
  backoff up to ``max_attempts`` (a new call id each time), then reported as RETRY (retryable)
  or FAILED, and the source redelivers or dead-letters the message. Key ordering holds the key
  until the last callback, as it holds it until a sync call's answer, and the source sees one
  :class:`~fastconn.message.Outcome` per message, as for sync calls.
* With ``ack = "on_accept"`` the 202 settles the call, as OpenFaaS connectors do (still, only a
  202 counts: any other answer from ``/async-function/`` is a failed call).
* Calls waiting for their callback are bounded by ``max_pending_callbacks``: when full, new
  async invocations wait, which is backpressure to the source like any other.
* Every call settles exactly once: a callback *claims* its call in the core's table before its
  result is handed over, so concurrent duplicates (409), a late callback racing the timeout, or
  a callback for a call already re-invoked cannot settle it twice. A call whose callback body is
  still arriving is not timed out.

The daemon's ingress answers ``/callback/<token>`` in the core (401 / 400 / 404 / 409 / 413 /
200, :meth:`fastconn.ingress.Ingress.add_callbacks`), with no Python per callback. A bare
dispatcher can serve the route on aiohttp instead (:meth:`Callbacks.register_routes`): there the
token is checked here and the result handed to the core in one call.

This module does not import the dispatcher: the dispatcher attaches its runtime
(:meth:`Callbacks.attach`). The metrics are the core's counts, read at scrape time.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fastconn import _core
from fastconn.http_routes import HttpRequest, HttpResponse, Route, add_to_aiohttp
from fastconn.metrics import add_function_stats

__all__ = ["AckMode", "CallbackMetrics", "CallbackSettings", "Callbacks"]

log = logging.getLogger("fastconn.callbacks")

AckMode = Literal["on_callback", "on_accept"]

# Callback headers set by the OpenFaaS gateway (queue worker).
_CALL_ID = "X-Call-Id"
_STATUS = "X-Function-Status"
_CALLBACK_PATH = "/callback/"
_SETTLED_MEMORY = 65536
"""Recently settled call ids remembered to answer duplicates with 409 rather than 404."""
_CLAIM_REFUSALS = {1: (409, "duplicate"), 2: (404, "unknown")}
"""The core's answers to a claim other than 0 (claimed): HTTP status and reason."""


@dataclass(frozen=True, slots=True)
class CallbackSettings:
    public_url: str
    """Base URL the gateway reaches fastconn's callback route at."""
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


class CallbackMetrics(Collector):
    """The callback metrics, read from the core at scrape time (no Python runs per callback):
    ``fastconn_callbacks_total{function,status}``, ``fastconn_callback_latency_seconds``,
    ``fastconn_pending_callbacks`` and ``fastconn_callback_rejected_total{reason}``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._runtime: _core.Runtime | None = None
        self._rejected_here: collections.Counter[str] = collections.Counter()
        """Refusals of the aiohttp route (:meth:`Callbacks.handle`); the core counts its own."""
        # A private registry when none is given: embedding apps keep their default one clean.
        self.rejected = _RejectedView(self)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self)  # last: registering collects once

    def use(self, runtime: _core.Runtime) -> None:
        self._runtime = runtime

    def reject(self, reason: str) -> None:
        self._rejected_here[reason] += 1

    def _live(self) -> _core.Runtime | None:
        runtime = self._runtime
        return None if runtime is None or runtime.closed else runtime

    def rejected_counts(self) -> dict[str, int]:
        counts = dict(self._rejected_here)
        runtime = self._live()
        for reason, n in runtime.callbacks_refused() if runtime else []:
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def collect(self) -> Iterator[Metric]:
        runtime = self._live()
        received = CounterMetricFamily(
            "fastconn_callbacks", "Async callbacks received", labels=["function", "status"]
        )
        latency = HistogramMetricFamily(
            "fastconn_callback_latency_seconds",
            "From an async invocation to its callback",
            labels=["function"],
        )
        for stats in runtime.callbacks_stats() if runtime else []:
            add_function_stats(received, latency, stats)
        pending = GaugeMetricFamily("fastconn_pending_callbacks", "Async calls waiting for their callback")
        pending.add_metric([], runtime.callbacks_pending() if runtime else 0)
        yield received
        yield latency
        yield pending
        yield self.rejected.family()


class _RejectedView:
    """``fastconn_callback_rejected_total{reason}`` on its own (``collect()``, as a
    prometheus metric has): refused callbacks and calls with no callback in time."""

    def __init__(self, metrics: CallbackMetrics) -> None:
        self._metrics = metrics

    def family(self) -> CounterMetricFamily:
        rejected = CounterMetricFamily(
            "fastconn_callback_rejected", "Callbacks refused, or not received in time", labels=["reason"]
        )
        for reason, n in sorted(self._metrics.rejected_counts().items()):
            rejected.add_metric([reason], n)
        return rejected

    def collect(self) -> list[Metric]:
        return [self.family()]


class Callbacks:
    """The settings, metrics and (for a bare dispatcher) the aiohttp route of async calls; the
    calls themselves live in the core."""

    def __init__(self, settings: CallbackSettings, metrics: CallbackMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or CallbackMetrics()
        self._runtime: _core.Runtime | None = None

    def attach(self, runtime: _core.Runtime) -> None:
        """Configures async calls in ``runtime`` (the dispatcher does, once it has one)."""
        if self._runtime is runtime:
            return
        s = self.settings
        runtime.callbacks_setup(s.secret, _SETTLED_MEMORY)
        runtime.async_calls(
            self._callback_base,
            s.timeout,
            s.max_pending,
            s.ack,
            s.max_attempts,
            list(s.retry_on),
            s.backoff_initial,
            s.backoff_max,
        )
        self._runtime = runtime
        self.metrics.use(runtime)

    @property
    def pending(self) -> int:
        """Async calls waiting for their callback."""
        if self._runtime is None or self._runtime.closed:
            return 0
        return self._runtime.callbacks_pending()

    # -- tokens ----------------------------------------------------------------------------

    def token(self, call_id: str) -> str:
        """The token of a call id (the core computes the same HMAC for the calls it sends)."""
        return hmac.digest(self.settings.secret, call_id.encode(), "sha256")[:20].hex()

    @property
    def _callback_base(self) -> str:
        return f"{self.settings.public_url.rstrip('/')}{_CALLBACK_PATH}"

    # -- the callback route outside the ingress ---------------------------------------------

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

    def _receiving(self, call_id: str, arriving: bool) -> None:
        # A call is not timed out while its callback's body is read.
        if self._runtime is not None and not self._runtime.closed and call_id.isascii():
            self._runtime.callbacks_receiving(call_id, arriving)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        call_id = request.header(_CALL_ID) or ""
        token = request.path[len(_CALLBACK_PATH) :]
        # Call ids are ASCII; anything else, even undecodable bytes, is not ours.
        if (
            not call_id
            or not call_id.isascii()
            or not token.isascii()
            or not hmac.compare_digest(token.encode(), self.token(call_id).encode())
        ):
            self.metrics.reject("bad_token")
            return _json(401, {"error": "bad callback token"})
        try:
            status = int(request.header(_STATUS) or "")
        except ValueError:
            self.metrics.reject("bad_request")
            return _json(400, {"error": f"missing or invalid {_STATUS}"})
        runtime = self._runtime
        if runtime is None or runtime.closed:
            return _json(503, {"error": "the dispatcher is not running"})
        limit = self.settings.max_body_bytes
        too_large = (
            f"the callback body exceeds [dispatch] max_callback_bytes ({limit} bytes); "
            "the result was not read: raise max_callback_bytes or make the function return less"
            if request.body_too_large
            else ""
        )
        # Too large: the call fails with the reason as its result.
        body = too_large.encode() if too_large else request.body
        code = runtime.callbacks_complete(call_id, status, list(request.headers), body, bool(too_large))
        if code:
            answer, reason = _CLAIM_REFUSALS[code]
            self.metrics.reject(reason)
            return _json(answer, {"error": f"{reason} call id {call_id}"})
        if too_large:
            log.warning("call %s: %s", call_id, too_large)
            self.metrics.reject("too_large")
            return _json(413, {"error": too_large})
        return _json(200, {"status": "settled"})


def _json(status: int, body: dict[str, str]) -> HttpResponse:
    return HttpResponse(
        status, (("Content-Type", "application/json; charset=utf-8"),), json.dumps(body).encode()
    )
