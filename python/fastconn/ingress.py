"""The Python side of the ingress server in the Rust core (``[server] listen``).

The core serves every request; Python is involved only in batches:

* **Python routes** (``/metrics``, a source's :class:`Route`): the core
  reads the body within the route's limit and queues the request; the loop is woken once per
  burst (an eventfd, as for completions), drains every queued request in one call, runs their
  handlers concurrently (a slow handler holds up only its own request), and answers everything
  finished in one loop iteration in one call.
* **Webhook and CloudEvents routes** are served by the core alone: it submits the message straight into the
  dispatcher and answers. Python hears of accepted messages in the same drain (metrics,
  ``print_request_body``) and of their outcomes through the dispatcher's completion queue,
  async invocations included (the core waits for their callbacks). A webhook whose requests
  need Python (a ``store``, ``decode = "s3"``) has the core hand them to the source's handler
  instead, like any Python route.
* **Callbacks** of async invocations (``/callback/<token>``, :meth:`Ingress.add_callbacks`) are
  answered by the core: token check, claim in its table of expected calls (exactly once: 409
  for duplicates), body limit; the result goes to the call waiting in the core. No Python
  runs per callback: the metrics read the core's counts at scrape time.
* **Readiness**: ``/readyz`` answers what Python last pushed (:meth:`Ingress.set_ready`), set on
  change, not asked per request.
* **Notices**: malformed requests and refused ones are logged here, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastconn import _core
from fastconn.callbacks import Callbacks
from fastconn.dispatcher import Dispatcher
from fastconn.http_routes import HttpRequest, HttpResponse, Route, serve
from fastconn.message import Message, Outcome, OutcomeCallback
from fastconn.ratelimit import RateLimitedLog
from fastconn.signatures import SignatureTuple

__all__ = [
    "INGRESS_TOKEN",
    "CloudEventsRoute",
    "Ingress",
    "IngressLimits",
    "WebhookRoute",
    "warn_undelivered",
]

log = logging.getLogger("fastconn.ingress")

INGRESS_TOKEN = 1 << 63
"""The bit the core sets in the tokens of messages the ingress submits itself."""


def warn_undelivered(lines: RateLimitedLog, kind: str, outcomes: Sequence[Outcome]) -> None:
    """One rate-limited line per failed message of an ingress source (``kind``: "webhook
    message", "cloudevent"): the sender had its 202, so the log is where a loss shows."""
    for outcome in outcomes:
        if not outcome.ok:
            failure = outcome.first_failure()
            lines.warning(
                "%s %s on %s not delivered: %s",
                kind,
                outcome.message_id,
                outcome.message.topic,
                failure and f"{failure.function} -> {failure.status_label}",
            )


@dataclass(frozen=True, slots=True)
class IngressLimits:
    """``[server]`` limits of the ingress server (see the README's ``[server]`` table)."""

    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 1024
    max_pending: int = 4096
    """Requests waiting for a Python handler; beyond it the core answers 503."""
    tls_cert: str | None = None
    """PEM certificate chain and key: the listener speaks HTTPS only."""
    tls_key: str | None = None
    http2: bool = False
    """Also HTTP/2 (h2 over TLS by ALPN, prior-knowledge h2c in clear)."""
    http2_max_concurrent_streams: int = 100


@dataclass(slots=True)
class WebhookRoute:
    """A webhook source served by the core (``POST /webhook/<topic>``)."""

    name: str
    max_body_bytes: int
    auth_token: str | None
    signature: SignatureTuple | None
    """The sender's signature check (:meth:`SignatureKeys.signature_rule`), or none."""
    python_route: Route
    """The same endpoint in Python, served instead while ``python`` is set (a ``store``,
    ``decode = "s3"``)."""
    on_accepted: Callable[[Sequence[Message]], None]
    on_outcomes: OutcomeCallback
    record_payload: bool = False
    accepting: bool = False
    python: bool = False
    asynchronous: bool = False
    """Invoke functions through ``/async-function/`` (the core waits for each callback)."""


@dataclass(slots=True)
class CloudEventsRoute:
    """A ``type = "cloudevents"`` source served by the core (``POST <path>``)."""

    name: str
    path: str
    max_body_bytes: int
    max_batch: int
    route_by: str
    delivery: str
    reply: bool
    auth_token: str | None
    signature: SignatureTuple | None
    """The sender's signature check (:meth:`SignatureKeys.signature_rule`), or none."""
    on_accepted: Callable[[Sequence[Message]], None]
    on_outcomes: OutcomeCallback
    record_payload: bool = False
    accepting: bool = False
    capture_replies: bool = False
    """Every event's function response comes back with its outcome (for a ``reply_sink``)."""
    asynchronous: bool = False
    """Invoke functions through ``/async-function/`` (the core waits for each callback)."""


@dataclass(slots=True)
class _Accepted:
    route: WebhookRoute | CloudEventsRoute
    message: Message


@dataclass
class Ingress:
    dispatcher: Dispatcher
    listen: str
    limits: IngressLimits = field(default_factory=IngressLimits)
    count_python: Callable[[str, int], None] | None = None
    """Told, once per drained batch, how many requests each Python route (by name) received."""
    host: str = ""
    port: int = 0
    _routes: list[Route] = field(default_factory=list)
    _webhooks: list[WebhookRoute] = field(default_factory=list)
    _cloudevents: list[CloudEventsRoute] = field(default_factory=list)
    _table: list[Route] = field(default_factory=list)
    _runtime: _core.Runtime | None = None
    _accepted: dict[int, _Accepted] = field(default_factory=dict)
    _answers: list[tuple[int, int, list[tuple[str, str]], bytes]] = field(default_factory=list)
    _flush_scheduled: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _malformed: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log, interval=10.0))
    _bad: dict[str, RateLimitedLog] = field(default_factory=dict)
    _readiness: tuple[bool, str, bool] | None = None
    _callbacks: Callbacks | None = None

    # -- configuration ---------------------------------------------------------------------

    def add_route(self, route: Route) -> None:
        """Serves ``route`` (before or after start)."""
        if any(r.path == route.path and r.method == route.method for r in self._routes):
            raise ValueError(f"route {route.method} {route.path} ({route.name}) is served already")
        self._routes.append(route)
        self._push_routes()

    def add_callbacks(self, callbacks: Callbacks) -> None:
        """Serves ``POST /callback/<token>`` for ``callbacks`` in the core."""
        if self._callbacks is not None:
            raise ValueError("the callbacks of async invocations are served already")
        self._callbacks = callbacks
        if self._runtime is not None:
            callbacks.attach(self._runtime)
        self._push_routes()

    def add_webhook(self, webhook: WebhookRoute) -> None:
        if self._webhooks:
            raise ValueError(
                f"webhook source {webhook.name}: /webhook/ is served by {self._webhooks[0].name} already; "
                "configure one webhook source"
            )
        self._webhooks.append(webhook)
        self._push_routes()

    def add_cloudevents(self, route: CloudEventsRoute) -> None:
        taken = [r.path for r in self._routes] + [c.path for c in self._cloudevents]
        if route.path in taken:
            raise ValueError(
                f"cloudevents source {route.name}: path {route.path} is served already; give it its own path"
            )
        self._cloudevents.append(route)
        self._push_routes()

    def set_webhook_state(
        self, name: str, *, accepting: bool | None = None, python: bool | None = None
    ) -> None:
        """``accepting``: the source takes events; ``python``: its requests need Python."""
        for webhook in self._webhooks:
            if webhook.name == name:
                if accepting is not None:
                    webhook.accepting = accepting
                if python is not None:
                    webhook.python = python
        for route in self._cloudevents:
            if route.name == name and accepting is not None:
                route.accepting = accepting
        self._push_routes()

    def set_ready(self, ready: bool, text: str, routing: bool) -> None:
        """What ``/readyz`` answers, and whether webhooks may submit (a topic map is loaded)."""
        state = (ready, text, routing)
        if state == self._readiness:
            return
        self._readiness = state
        if self._runtime is not None:
            self._runtime.ingress_ready(ready, text, routing)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        runtime = self.dispatcher.runtime
        self.host, self.port = runtime.start_ingress(
            listen=self.listen,
            header_timeout=self.limits.header_timeout,
            idle_timeout=self.limits.idle_timeout,
            max_connections=self.limits.max_connections,
            max_pending=self.limits.max_pending,
            tls_cert=self.limits.tls_cert,
            tls_key=self.limits.tls_key,
            http2=self.limits.http2,
            http2_max_concurrent_streams=self.limits.http2_max_concurrent_streams,
        )
        self._runtime = runtime
        if self._callbacks is not None:
            self._callbacks.attach(runtime)
        asyncio.get_running_loop().add_reader(runtime.ingress_wake_fd, self._on_wake)
        self.dispatcher.set_ingress_sink(self._on_outcomes)
        self._push_routes()
        if self._readiness is not None:
            ready, text, routing = self._readiness
            runtime.ingress_ready(ready, text, routing)

    async def stop(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        runtime.stop_ingress()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(runtime.ingress_wake_fd)
        for task in list(self._tasks):
            task.cancel()

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.limits.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    def connections(self) -> tuple[int, int, int, int]:
        """(open, evicted, refused, timed_out) connections."""
        return self._runtime.ingress_connections() if self._runtime else (0, 0, 0, 0)

    # -- the table the core serves ---------------------------------------------------------

    def _push_routes(self) -> None:
        table = list(self._routes)
        webhooks = []
        for w in self._webhooks:
            fallback = len(table)
            table.append(w.python_route)
            webhooks.append(
                (
                    w.name,
                    w.max_body_bytes,
                    w.auth_token,
                    w.signature,
                    w.accepting,
                    fallback if w.python else None,
                    w.record_payload,
                    w.asynchronous,
                )
            )
        cloudevents = []
        for c in self._cloudevents:
            cloudevents.append(
                (
                    c.name,
                    c.path,
                    c.max_body_bytes,
                    c.max_batch,
                    c.route_by,
                    c.delivery,
                    c.reply,
                    c.auth_token,
                    c.signature,
                    c.accepting,
                    c.record_payload,
                    (c.capture_replies, c.asynchronous),
                )
            )
        self._table = table
        if self._runtime is None:
            return
        # A fallback route is reachable only through its webhook: listed (so requests can name
        # it by index) under a path no request has.
        python = [
            (
                r.method,
                r.path,
                r.prefix,
                r.max_body_bytes,
                r.oversized_to_handler,
            )
            for r in self._routes
        ]
        python += [(r.method, "", False, r.max_body_bytes, False) for r in table[len(self._routes) :]]
        callback_max_body = self._callbacks.settings.max_body_bytes if self._callbacks else None
        self._runtime.ingress_routes(python, webhooks, cloudevents, callback_max_body)

    # -- batches from the core -------------------------------------------------------------

    def _on_wake(self) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.read(runtime.ingress_wake_fd, 8)
        requests, accepted, notices = runtime.ingress_drain()
        if accepted:
            self._on_accepted(accepted)
        for kind, source, remote, text in notices:
            self._notice(kind, source, remote, text)
        handed: dict[str, int] = {}
        for raw in requests:
            name = self._start_request(raw)
            handed[name] = handed.get(name, 0) + 1
        if self.count_python is not None:
            for name, count in handed.items():
                self.count_python(name, count)

    def _on_accepted(self, records: list[tuple[int, str, str, str, bytes | None]]) -> None:
        by_route: dict[str, list[Message]] = {}
        routes: dict[str, WebhookRoute | CloudEventsRoute] = {w.name: w for w in self._webhooks}
        routes.update((c.name, c) for c in self._cloudevents)
        for token, source, topic, message_id, payload in records:
            route = routes.get(source)
            if route is None:
                continue
            message = Message(topic, payload or b"", message_id=message_id)
            self._accepted[token] = _Accepted(route, message)
            by_route.setdefault(source, []).append(message)
        for source, messages in by_route.items():
            try:
                routes[source].on_accepted(messages)
            except Exception:
                log.exception("webhook %s: counting accepted messages failed", source)

    def _on_outcomes(self, records: list[tuple[int, int, tuple[object, ...], bool]]) -> None:
        """Outcomes of messages the core's webhooks submitted (from the dispatcher's drain)."""
        if any(record[0] not in self._accepted for record in records):
            # Accepted before submitted, so the record is queued here already: take it now.
            self._on_wake()
        verdicts = Dispatcher.VERDICTS
        grouped: dict[str, tuple[WebhookRoute | CloudEventsRoute, list[Outcome]]] = {}
        for token, verdict_code, raw_results, key_held in records:
            accepted = self._accepted.pop(token, None)
            if accepted is None:
                log.error("an outcome for an ingress message nobody accepted (token %d): a bug", token)
                continue
            outcome = Outcome._from_wire(
                accepted.message,
                verdicts[verdict_code],
                accepted.message.message_id or "",
                raw_results,  # type: ignore[arg-type]
                key_held,
            )
            grouped.setdefault(accepted.route.name, (accepted.route, []))[1].append(outcome)
        for route, outcomes in grouped.values():
            self.dispatcher.deliver_final(route.on_outcomes, outcomes)

    def _notice(self, kind: str, source: str | None, remote: str, text: str) -> None:
        if kind == "malformed":
            self._malformed.warning("malformed HTTP request from %s: %s", remote, text)
            return
        key = source or ""
        lines = self._bad.get(key)
        if lines is None:
            lines = self._bad[key] = RateLimitedLog(log, interval=10.0)
        if source:
            lines.warning("source %s: bad request from %s: %s", source, remote, text)
        else:
            lines.warning("bad request from %s: %s", remote, text)

    def _start_request(
        self, raw: tuple[int, int, str, str, str, list[tuple[str, bytes]], bytes, str, bool]
    ) -> str:
        """Starts the request's handler; returns its route's name ("" when it has none)."""
        request_id, index, method, path, query, headers, body, remote, too_large = raw
        route = self._table[index] if 0 <= index < len(self._table) else None
        if route is None:  # the table changed under the request: it has no handler now
            self._answer(request_id, HttpResponse(404, (), b"404: Not Found\n"))
            return ""
        request = HttpRequest(
            method=method,
            path=urllib.parse.unquote(path, errors="surrogateescape"),
            query=tuple(urllib.parse.parse_qsl(query, keep_blank_values=True)),
            # As aiohttp decodes them: bytes that are not UTF-8 become lone surrogates, which
            # every check treats as a wrong value rather than an encoding error.
            headers=tuple((k, v.decode("utf-8", "surrogateescape")) for k, v in headers),
            body=body,
            remote=remote,
            body_too_large=too_large,
        )
        task = asyncio.ensure_future(self._run(request_id, route, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return route.name

    async def _run(self, request_id: int, route: Route, request: HttpRequest) -> None:
        self._answer(request_id, await serve(route, request))

    def _answer(self, request_id: int, response: HttpResponse) -> None:
        self._answers.append((request_id, response.status, list(response.headers), response.body))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Every answer of this loop iteration in one call."""
        self._flush_scheduled = False
        answers, self._answers = self._answers, []
        if self._runtime is not None and answers:
            self._runtime.ingress_respond(answers)
