"""``type = "webhook"``: events POSTed over HTTP (GitHub, IFTTT, any service with webhooks).

``POST /webhook/<topic>`` on the admin server. The body is the payload; the request's headers
(except hop-by-hop and auth ones) pass through to the function. Answers:

* 202 + ``X-Message-Id`` once accepted for dispatch (the sender may forget it: fastconn retries);
* 503 + ``Retry-After`` when the dispatcher is full (backpressure reaches the sender);
* 413 over ``max_body_bytes``; 401 on a wrong bearer token or HMAC signature;
* 400 for a topic that is not a concrete one (wildcards, control characters): see
  :func:`topic_problem`;
* 503 + ``Retry-After`` at once while there is no topic map yet (the sender retries; a request
  held open would only tie up a connection);
* with ``?wait=true``: the first function's status and body once every function answered.

After a 202 the sender has nothing to acknowledge: a message that fails for good is counted in
``fastconn_messages_failed_total`` and logged, as for any at-most-once source.

Malformed requests are the sender's problem, not the daemon's: they get a 4xx naming what is
wrong and one rate-limited log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable
from typing import Final, Literal, TypeVar

from aiohttp import web
from pydantic import ConfigDict, Field

from fastconn.errors import DispatcherClosed
from fastconn.headers import passthrough
from fastconn.health import HEALTHY, SourceHealth
from fastconn.http_body import IncompleteBody, read_at_most
from fastconn.ingress_store import IngressStore, IngressStoreConfig, StoredEvent, StoreUnavailable
from fastconn.message import Message, Outcome, Verdict
from fastconn.ratelimit import RateLimitedLog
from fastconn.signatures import SignatureKeys, signature_problem
from fastconn.source import SourceContext

log = logging.getLogger("fastconn.source.webhook")

T = TypeVar("T")

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
    store: IngressStoreConfig | None = None
    """Durable ingress: answer 202 only once the event is stored in this JetStream stream, and
    dispatch it from there (see :mod:`fastconn.ingress_store`)."""


CONFIG_MODEL = WebhookConfig


def create(config: WebhookConfig) -> WebhookSource:
    return WebhookSource(config)


class WebhookSource:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._accepting = False
        # Set by close(): requests still waiting for their outcome get a 503 then, so a pending
        # request cannot hold up the shutdown.
        self._closed = asyncio.Event()
        self._malformed_log = RateLimitedLog(log, interval=10.0)
        # Per-function detail is in fastconn.functions' aggregated lines; this says which messages.
        self._undelivered_log = RateLimitedLog(log, interval=10.0)
        self._store = IngressStore(config.store, config.name) if config.store is not None else None

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        # The body is streamed by read_at_most (own limit, clear 413), so aiohttp's
        # client_max_size, which only bounds request.read(), does not apply here.
        # [\s\S], not ".": a topic with a (percent-encoded) newline must reach topic_problem and
        # get its 400, not a bare 404.
        ctx.app.router.add_post(r"/webhook/{topic:[\s\S]+}", self._handle)

    async def start(self) -> None:
        if self._store is not None:
            await self._store.open()
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        self._closed.set()
        if self._store is not None:
            await self._store.close()

    def health(self) -> SourceHealth:
        """The store's connection (a webhook without a store has nothing to lose)."""
        if self._store is None or self._store.health is None:
            return HEALTHY
        return self._store.health.health()

    # -- request handling ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ctx = self._ctx
        if ctx is None or not self._accepting:
            return _error(503, "not accepting events (starting or shutting down)", retry_after=1)
        denied = self._check_token(request)
        if denied:
            return denied
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            return _error(
                413,
                f"body of {request.content_length} bytes exceeds max_body_bytes "
                f"({self.config.max_body_bytes})",
            )
        try:
            body = await read_at_most(request, self.config.max_body_bytes)
        except IncompleteBody as exc:
            return self._malformed(request, str(exc))
        if body is None:
            return _error(413, f"body exceeds max_body_bytes ({self.config.max_body_bytes})")
        denied = self._check_signature(request, body)
        if denied:
            return denied
        topic = request.match_info["topic"]
        problem = topic_problem(topic)
        if problem:
            return self._malformed(request, problem)
        if not ctx.dispatcher.has_capacity:
            return _error(503, "dispatcher at capacity, retry later", retry_after=1)
        # The sender's credentials and signature authenticate it to fastconn, not to functions.
        headers = passthrough(
            request.headers.items(),
            source_reserved=frozenset({self.config.signature_header.lower()}),
            drop_credentials=True,
        )
        # The id is made here so the 202 can carry it; it stays the same across retries.
        message = Message(topic, body, headers, message_id=uuid.uuid4().hex)
        wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
        if self._store is not None:
            return await self._stored(message, wait)
        # No topic map yet: answer at once. Holding the request for startup_wait would keep a
        # connection (and a sender) waiting for a table that may be minutes away.
        if not await ctx.wait_ready(0):
            return _error(503, "topic map not loaded yet", retry_after=1)
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[Outcome] = loop.create_future()

        def on_outcomes(outcomes: list[Outcome]) -> None:
            ctx.count_settled(self.name, outcomes)
            for outcome in outcomes:
                if not outcome.ok:
                    failure = outcome.first_failure()
                    self._undelivered_log.warning(
                        "webhook message %s on %s not delivered: %s",
                        outcome.message_id,
                        topic,
                        failure and f"{failure.function} -> {failure.status_label}",
                    )
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
            return _error(503, "shutting down", retry_after=1)
        except ValueError as exc:
            # The core refused the message (something validation above did not foresee): the
            # request is at fault, not the daemon.
            return self._malformed(request, f"message refused: {exc}")
        if not wait:
            return web.Response(
                status=202, text="accepted\n", headers={"X-Message-Id": message.message_id or ""}
            )
        # After close() the dispatcher is gone: an outcome still missing will never come.
        outcome = await _unless(settled, self._closed)
        if outcome is None:
            return _error(
                503, "shut down before every function answered", retry_after=1, message_id=message.message_id
            )
        return _waited_response(outcome, outcome.message_id)

    async def _stored(self, message: Message, wait: bool) -> web.Response:
        """Durable ingress: 202 once the stream holds the event; its JetStream source delivers."""
        store = self._store
        if store is None or wait:
            return _error(
                400,
                "?wait=true is not available on a webhook with a store: the event is dispatched "
                "later from the stream (drop ?wait, or use a webhook without a store)",
            )
        message_id = message.message_id or ""
        try:
            await store.put([StoredEvent(message.topic, message.payload, message.headers, message_id)])
        except StoreUnavailable as exc:
            self._undelivered_log.warning("webhook %s: event not stored: %s", self.name, exc)
            return _error(503, "event store unavailable, retry later", retry_after=1)
        ctx = self._ctx
        if ctx is not None:
            ctx.count_received(self.name, [message])
        return web.Response(status=202, text="stored\n", headers={"X-Message-Id": message_id})

    def _check_token(self, request: web.Request) -> web.Response | None:
        token = self.config.auth_token
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        # surrogateescape: a header that is not UTF-8 is a wrong token, not an encoding error.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token", www_authenticate='Bearer realm="fastconn"')
        return None

    def _check_signature(self, request: web.Request, body: bytes) -> web.Response | None:
        if self.config.hmac_secret is None:
            return None
        # Only the signature header is passed: a header value that is not UTF-8 elsewhere in the
        # request must not turn into an encoding error here.
        wanted = self.config.signature_header
        headers = [(wanted, value) for value in request.headers.getall(wanted, ())[:1]]
        problem = signature_problem(self.config, headers, body)
        return None if problem is None else _error(401, problem)

    def _malformed(self, request: web.Request, problem: str) -> web.Response:
        self._malformed_log.warning(
            "source %s: bad request from %s: %s", self.name, request.remote or "?", problem
        )
        return _error(400, problem)


def _waited_response(outcome: Outcome, message_id: str) -> web.Response:
    headers = {"X-Message-Id": message_id}
    if outcome.verdict is Verdict.UNROUTED:
        return web.Response(status=404, text="no function subscribes to this topic\n", headers=headers)
    first = outcome.results[0]
    headers["X-Function-Name"] = first.function
    headers["X-Function-Status"] = first.status_label
    if first.status == 0:
        return web.Response(status=502, text=f"{first.function}: {first.error.label}\n", headers=headers)
    content_type = next((v for k, v in first.headers or () if k.lower() == "content-type"), None)
    response = web.Response(status=first.status, body=first.body or b"", headers=headers)
    if content_type:
        response.headers["Content-Type"] = content_type
    return response


async def _unless(work: Awaitable[T], event: asyncio.Event) -> T | None:
    """``work``'s result, or None (``work`` cancelled) when ``event`` is set first."""
    task = asyncio.ensure_future(work)
    interrupt = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupt.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def _error(
    status: int,
    reason: str,
    *,
    retry_after: int | None = None,
    www_authenticate: str | None = None,
    message_id: str | None = None,
) -> web.Response:
    headers = {}
    if message_id is not None:
        headers["X-Message-Id"] = message_id
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if www_authenticate is not None:
        headers["WWW-Authenticate"] = www_authenticate
    return web.json_response({"error": reason}, status=status, headers=headers)
