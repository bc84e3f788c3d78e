"""``type = "webhook"``: events POSTed over HTTP (GitHub, GitLab, Stripe, IFTTT, any service
with webhooks).

``POST /webhook/<topic>`` on the ingress server (``[server] listen``), served by the Rust core
without Python per request (``rust/core/src/ingress/webhook.rs``): the body is the payload; the
request's headers (except hop-by-hop, reserved, credential and signature ones) pass through to
the function. Answers:

* 202 + ``X-Message-Id`` once accepted for dispatch (the sender may forget it: fastconn retries);
* 503 + ``Retry-After`` when the dispatcher is full (backpressure reaches the sender);
* 413 over ``max_body_bytes`` (from ``Content-Length`` before reading, else while reading);
* 401 on a wrong bearer token (``Authorization: Bearer`` or ``?key=``, as IFTTT's "Make a web
  request" can send it) or a wrong signature, any scheme of :mod:`fastconn.signatures` (GitHub's
  ``sha256=<hex>`` HMAC, Shopify's base64, Stripe's timestamped ``v1=``, GitLab's token),
  checked by the core in constant time, the answer naming what is wrong;
* 400 for a topic that is not a concrete one (wildcards, control characters): see
  :func:`topic_problem`;
* 503 + ``Retry-After`` at once while there is no topic map yet (the sender retries; a request
  held open would only tie up a connection);
* with ``?wait=true``: the first function's status and body once every function answered.

Delivery guarantee: at most once after the 202 (at least once with a ``store``). The sender has
nothing to acknowledge: a message that fails for good is counted in
``fastconn_messages_failed_total`` and logged. Python learns of accepted messages and of their
outcomes in batches (metrics, ``print_request_body``).

With async invocation (``asynchronous_invocation``, or functions marked asynchronous) the core
still serves the route: each call waits for its callback in the core, and ``?wait=true`` answers
with the callback's result. With a ``store`` (durable ingress: 202 only once a JetStream stream
or a Kafka topic holds the event, :mod:`fastconn.ingress_store`) or ``decode = "s3"``, the core
hands the requests to this module's Python handler instead, which gives the same answers and
checks signatures with the same core rule.

Malformed requests are the sender's problem, not the daemon's: they get a 4xx naming what is
wrong and one rate-limited log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import Final, Literal

from pydantic import ConfigDict, Field

from fastconn.errors import DispatcherClosed
from fastconn.headers import passthrough
from fastconn.health import HEALTHY, SourceHealth
from fastconn.http_routes import HttpRequest, HttpResponse, Route
from fastconn.ingress import WebhookRoute
from fastconn.ingress_answers import json_error, unless, waited_response
from fastconn.ingress_store import IngressStoreConfig, StoredEvent, StoreUnavailable, open_store
from fastconn.message import Message, Outcome
from fastconn.ratelimit import RateLimitedLog
from fastconn.s3_events import S3EventError, decode_notification
from fastconn.signatures import SignatureKeys, signature_problem
from fastconn.source import SourceContext
from fastconn.sources._ingress_events import IngressEventSource

log = logging.getLogger("fastconn.source.webhook")

PREFIX: Final = "/webhook/"

# Wildcards of the topic patterns functions subscribe with: MQTT's on "/" levels, NATS's on "."
# tokens (inside a longer token they are literals, as in the router).
_MQTT_WILDCARDS: Final = frozenset({"+", "#"})
_NATS_WILDCARDS: Final = frozenset({"*", ">"})


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` (from the URL path) cannot be published to, or None when it can."""
    for char in topic:
        if char < " " or char == "\x7f":
            return (
                f"topic {topic!r} contains the control character U+{ord(char):04X}: "
                "use printable characters only"
            )
        if "\ud800" <= char <= "\udfff":
            return f"topic {topic!r} is not valid UTF-8 (after percent-decoding): encode it as UTF-8"
    wildcard = next((t for t in topic.split("/") if t in _MQTT_WILDCARDS), None) or next(
        (t for t in topic.split(".") if t in _NATS_WILDCARDS), None
    )
    if wildcard is not None:
        return (
            f"topic {topic!r} contains the wildcard {wildcard!r}: wildcards are for subscriptions; "
            "publish to a concrete topic"
        )
    return None


class WebhookConfig(SignatureKeys):
    """``[[sources]] type = "webhook"``: accept events POSTed to the built-in HTTP server. The
    signature keys (``hmac_secret``, ``signature_*``) are :class:`SignatureKeys`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"] = "webhook"
    name: str = "webhook"
    max_body_bytes: int = Field(default=1048576, ge=1)
    auth_token: str | None = None
    """Bearer token required in ``Authorization: Bearer <token>``; None disables the check."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; ``?wait=true`` waits for the callback."""
    decode: Literal["none", "s3"] = "none"
    """``s3``: the body is an S3/MinIO bucket notification (MinIO's webhook target): each record
    becomes its own message, routed by bucket and event (see :mod:`fastconn.s3_events`)."""
    store: IngressStoreConfig | None = None
    """Durable ingress: answer 202 only once the event is stored in this JetStream stream or
    Kafka topic, and dispatch it from there (see :mod:`fastconn.ingress_store`)."""


CONFIG_MODEL = WebhookConfig


def create(config: WebhookConfig) -> WebhookSource:
    return WebhookSource(config)


class WebhookSource(IngressEventSource[WebhookConfig]):
    event_kind = "webhook message"

    def __init__(self, config: WebhookConfig) -> None:
        super().__init__(config, log)
        self._accepting = False
        self._malformed_log = RateLimitedLog(log, interval=10.0)
        self._store = open_store(config.store, config.name) if config.store is not None else None

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        c = self.config
        route = Route(
            "POST", PREFIX, self._handle, max_body_bytes=c.max_body_bytes, name=self.name, prefix=True
        )
        if ctx.ingress is None:
            ctx.add_route(route)  # no ingress server (a bare context): the Python handler serves
            return
        ctx.ingress.add_webhook(
            WebhookRoute(
                name=self.name,
                max_body_bytes=c.max_body_bytes,
                auth_token=c.auth_token,
                signature=c.signature_rule(),
                python_route=route,
                on_accepted=self._on_accepted,
                on_outcomes=self._on_outcomes,
                record_payload=ctx.print_request_body,
                python=self._served_in_python,
                asynchronous=c.asynchronous_invocation,
            )
        )

    @property
    def _served_in_python(self) -> bool:
        """Whether every request takes the Python handler rather than the core's: a store
        (durable ingress publishes from Python) or ``decode = "s3"`` (one request, many
        messages). Async invocation and signatures never need Python: the core waits for
        callbacks and checks every scheme of :mod:`fastconn.signatures`."""
        c = self.config
        return c.store is not None or c.decode != "none"

    async def start(self) -> None:
        if self._store is not None:
            await self._store.open()
        self._accepting = True
        self._tell_ingress(accepting=True)

    async def stop(self) -> None:
        self._accepting = False
        self._tell_ingress(accepting=False)

    async def close(self) -> None:
        self._closed.set()
        if self._store is not None:
            await self._store.close()

    def health(self) -> SourceHealth:
        """The store's connection (a webhook without a store has nothing to lose)."""
        if self._store is None or self._store.health is None:
            return HEALTHY
        return self._store.health.health()

    # -- the Python handler (async invocation, or no ingress server) -------------------------

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        ctx = self._ctx
        if ctx is None or not self._accepting:
            return json_error(503, "not accepting events (starting or shutting down)", retry_after=1)
        denied = self._check_token(request)
        if denied:
            return denied
        denied = self._check_signature(request)
        if denied:
            return denied
        topic = request.path[len(PREFIX) :]
        problem = topic_problem(topic)
        if problem:
            return self._malformed(request, problem)
        if not ctx.dispatcher.has_capacity:
            return json_error(503, "dispatcher at capacity, retry later", retry_after=1)
        # The sender's credentials and signature authenticate it to fastconn, not to functions.
        headers = passthrough(
            request.headers,
            source_reserved=frozenset({self.config.signature_header.lower()}),
            drop_credentials=True,
        )
        wait = (request.query_value("wait") or "").lower() in ("1", "true", "yes")
        if self.config.decode == "s3":
            return await self._s3_records(request, headers, wait)
        # The id is made here so the 202 can carry it; it stays the same across retries.
        message = Message(topic, request.body, headers, message_id=uuid.uuid4().hex)
        if self._store is not None:
            return await self._stored([message], wait)
        # No topic map yet: answer at once. Holding the request for startup_wait would keep a
        # connection (and a sender) waiting for a table that may be minutes away.
        if not await ctx.wait_ready(0):
            return json_error(503, "topic map not loaded yet", retry_after=1)
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[Outcome] = loop.create_future()

        def on_outcomes(outcomes: list[Outcome]) -> None:
            self._on_outcomes(outcomes)
            for outcome in outcomes:
                if not settled.done():
                    settled.set_result(outcome)

        try:
            await ctx.submit(
                self.name,
                [message],
                on_outcomes,
                capture=wait,
                asynchronous=self.config.asynchronous_invocation,
            )
        except DispatcherClosed:
            return json_error(503, "shutting down", retry_after=1)
        except ValueError as exc:
            # The core refused the message (something validation above did not foresee): the
            # request is at fault, not the daemon.
            return self._malformed(request, f"message refused: {exc}")
        if not wait:
            return HttpResponse(202, (("X-Message-Id", message.message_id or ""),), b"accepted\n")
        # After close() the dispatcher is gone: an outcome still missing will never come.
        outcome = await unless(settled, self._closed)
        if outcome is None:
            return json_error(
                503, "shut down before every function answered", retry_after=1, message_id=message.message_id
            )
        return waited_response(outcome, outcome.message_id)

    async def _s3_records(
        self, request: HttpRequest, headers: list[tuple[str, str]], wait: bool
    ) -> HttpResponse:
        """``decode = "s3"`` (MinIO's webhook target, or any S3-style notification): one
        message per record, routed by bucket and event (the URL's topic is not used), each with
        its stable record id; 202 once all are accepted (or stored)."""
        ctx = self._ctx
        if ctx is None:
            return json_error(503, "not accepting events (starting or shutting down)", retry_after=1)
        if wait:
            return json_error(400, "?wait=true is not available with decode = s3 (one request, many records)")
        try:
            records = decode_notification(request.body)
        except S3EventError as exc:
            return self._malformed(request, f"not an S3 event notification: {exc}")
        own = frozenset(name.lower() for name, _ in records[0].headers) if records else frozenset()
        forwarded = [(name, value) for name, value in headers if name.lower() not in own]
        messages = [
            Message(r.topic, r.body, [*r.headers, *forwarded], message_id=r.message_id) for r in records
        ]
        ids = ", ".join(m.message_id or "" for m in messages)
        if not messages:  # s3:TestEvent: nothing to deliver
            return HttpResponse(202, (), b"no records\n")
        if self._store is not None:
            return await self._stored(messages, wait)
        if not await ctx.wait_ready(0):
            return json_error(503, "topic map not loaded yet", retry_after=1)
        try:
            await ctx.submit(self.name, messages, self._on_outcomes)
        except DispatcherClosed:
            return json_error(503, "shutting down", retry_after=1)
        except ValueError as exc:
            return self._malformed(request, f"message refused: {exc}")
        return HttpResponse(202, (("X-Message-Id", ids),), b"accepted\n")

    async def _stored(self, messages: list[Message], wait: bool) -> HttpResponse:
        """Durable ingress: 202 once the stream holds the events; its JetStream source delivers."""
        store = self._store
        if store is None or wait:
            return json_error(
                400,
                "?wait=true is not available on a webhook with a store: the event is dispatched "
                "later from the stream (drop ?wait, or use a webhook without a store)",
            )
        events = [StoredEvent(m.topic, m.payload, m.headers, m.message_id or "") for m in messages]
        try:
            await store.put(events)
        except StoreUnavailable as exc:
            self._undelivered_log.warning("webhook %s: event not stored: %s", self.name, exc)
            return json_error(503, "event store unavailable, retry later", retry_after=1)
        ctx = self._ctx
        if ctx is not None:
            ctx.count_received(self.name, messages)
        ids = ", ".join(e.message_id for e in events)
        return HttpResponse(202, (("X-Message-Id", ids),), b"stored\n")

    def _check_token(self, request: HttpRequest) -> HttpResponse | None:
        token = self.config.auth_token
        if token is None:
            return None
        given = request.header("Authorization")
        if given is not None:
            # surrogateescape: a header that is not UTF-8 is a wrong token, not an encoding error.
            ok = hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode())
        else:
            key = request.query_value("key") or ""
            ok = hmac.compare_digest(key.encode("utf-8", "surrogateescape"), token.encode())
        if not ok:
            return json_error(
                401, "missing or wrong bearer token", www_authenticate='Bearer realm="fastconn"'
            )
        return None

    def _check_signature(self, request: HttpRequest) -> HttpResponse | None:
        if self.config.hmac_secret is None:
            return None
        wanted = self.config.signature_header
        value = request.header(wanted)
        problem = signature_problem(self.config, [] if value is None else [(wanted, value)], request.body)
        return None if problem is None else json_error(401, problem)

    def _malformed(self, request: HttpRequest, problem: str) -> HttpResponse:
        self._malformed_log.warning(
            "source %s: bad request from %s: %s", self.name, request.remote or "?", problem
        )
        return json_error(400, problem)
