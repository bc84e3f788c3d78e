"""The SNS source: one HTTP route that checks each delivery and hands notifications to the
dispatcher (see the package docstring for what is accepted and answered)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from typing import Any

from fastconn.backoff import doubling
from fastconn.errors import DispatcherClosed
from fastconn.http_routes import HttpRequest, HttpResponse, Route, text_response
from fastconn.message import Outcome
from fastconn.ratelimit import RateLimitedLog
from fastconn.redact import redact_text
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.sns.certs import BadCertificate, CertificateStore, FetchFailed, SnsFetcher
from fastconn.sources.sns.config import SnsConfig
from fastconn.sources.sns.envelope import (
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    Envelope,
    EnvelopeError,
    parse_envelope,
)
from fastconn.sources.sns.hosts import url_problem
from fastconn.sources.sns.messages import Notification, NotificationDecoder, notification_messages
from fastconn.sources.sns.signature import signature_problem
from fastconn.sources.sns.subscribe import subscribe

__all__ = ["SnsSource"]

log = logging.getLogger("fastconn.source.sns")

_RETRY_AFTER = 1
"""Seconds, in 503 answers (SNS keeps to its own retry policy; other senders may read it)."""


class SnsSource:
    def __init__(self, config: SnsConfig, decode: NotificationDecoder = notification_messages) -> None:
        self.config = config
        self.name = config.name
        self._decode = decode
        self._patterns = config.host_patterns()
        self._topics = frozenset(config.topic_arns)
        self._fetcher = SnsFetcher(ca_file=config.cert_ca_file, timeout=config.fetch_timeout)
        self.certificates = CertificateStore(self._fetcher, max_entries=config.cert_cache_size)
        self._ctx: SourceContext | None = None
        self._accepting = False
        self._stopped = asyncio.Event()
        self._errors: dict[str, Any] = {}
        self._refused_log = RateLimitedLog(log, interval=10.0)
        self._unavailable_log = RateLimitedLog(log, interval=10.0)
        self._undelivered_log = RateLimitedLog(log, interval=10.0)
        self.subscription_arn: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        route = Route(
            "POST", self.config.path, self.handle, max_body_bytes=self.config.max_body_bytes, name=self.name
        )
        ctx.add_route(route)

    async def start(self) -> None:
        await self._fetcher.start()
        self._accepting = True
        if self.config.subscribe is not None:
            self._require_ctx().supervise(f"{self.name}.subscribe", self._subscribe)

    async def stop(self) -> None:
        self._accepting = False
        self._stopped.set()

    async def close(self) -> None:
        await self._fetcher.close()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx

    async def _subscribe(self) -> None:
        """Calls Subscribe until it succeeds (the endpoint serves meanwhile: an existing
        subscription keeps working while SNS or the credentials are unavailable)."""
        config = self.config.subscribe
        assert config is not None
        attempt = 0
        while not self._stopped.is_set():
            try:
                self.subscription_arn = await subscribe(config, self.config.raw_delivery_token)
            except Exception as exc:  # botocore's and the network's: all mean "try again later"
                attempt += 1
                self._count("subscribe")
                delay = doubling(attempt, 1.0, 60.0)
                log.warning(
                    "source %s: Subscribe(%s, %s) failed: %s: %s; retrying in %.0fs",
                    self.name,
                    config.topic_arn,
                    redact_text(config.endpoint),
                    type(exc).__name__,
                    redact_text(str(exc)),
                    delay,
                )
                if await wait_or_stop(self._stopped, delay):
                    return
                continue
            log.info(
                "source %s: subscribed %s to %s (%s)",
                self.name,
                redact_text(config.endpoint),
                config.topic_arn,
                self.subscription_arn,
            )
            return

    # -- requests --------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """One delivery from SNS: 200 once accepted (or confirmed), 403 when refused (SNS does not
        retry a 4xx), 503 when it should come again (no certificate yet, no room)."""
        ctx = self._ctx
        if ctx is None or not self._accepting:
            return _answer(
                503, "not accepting deliveries (starting or shutting down)", retry_after=_RETRY_AFTER
            )
        kind = request.header("x-amz-sns-message-type")
        raw = (request.header("x-amz-sns-rawdelivery") or "").lower() == "true"
        if raw and kind in (None, NOTIFICATION):
            return await self._raw(ctx, request)
        try:
            envelope = parse_envelope(request.body)
        except EnvelopeError as exc:
            return self._refuse(request, 400, "malformed", str(exc))
        if kind is not None and kind != envelope.type:
            return self._refuse(
                request, 403, "forged", f"header x-amz-sns-message-type {kind!r} contradicts the signed Type"
            )
        if envelope.topic_arn not in self._topics:
            return self._refuse(request, 403, "topic", f"topic {envelope.topic_arn!r} is not in topic_arns")
        refused = await self._check_signature(request, envelope)
        if refused is not None:
            return refused
        if envelope.type == NOTIFICATION:
            fields = envelope.fields
            notification = Notification(
                topic_arn=envelope.topic_arn,
                message_id=envelope.message_id,
                message=fields["Message"].encode(),
                subject=fields.get("Subject"),
                timestamp=fields["Timestamp"],
                attributes=envelope.attributes,
                subscription_arn=request.header("x-amz-sns-subscription-arn"),
            )
            return await self._deliver(ctx, request, notification)
        if envelope.type == SUBSCRIPTION_CONFIRMATION:
            return await self._confirm(request, envelope)
        log.info(
            "source %s: unsubscribed from %s (%s)", self.name, envelope.topic_arn, envelope.fields["Message"]
        )
        return _answer(200, "unsubscribe confirmation received")

    async def _check_signature(self, request: HttpRequest, envelope: Envelope) -> HttpResponse | None:
        url = envelope.signing_cert_url
        problem = url_problem(url, self._patterns, suffix=".pem")
        if problem is not None:
            return self._refuse(request, 403, "cert_url", f"SigningCertURL refused: {problem}")
        try:
            key = await self.certificates.public_key(url)
        except FetchFailed as exc:
            # Not the sender's fault as far as we know: SNS retries a 5xx, so nothing is lost.
            self._count("cert_fetch")
            self._unavailable_log.warning("source %s: signing certificate unavailable: %s", self.name, exc)
            return _answer(
                503, "the signing certificate could not be fetched; retry later", retry_after=_RETRY_AFTER
            )
        except BadCertificate as exc:
            return self._refuse(request, 403, "cert", str(exc))
        problem = signature_problem(envelope, key)
        if problem is not None:
            return self._refuse(request, 403, "signature", problem)
        return None

    async def _confirm(self, request: HttpRequest, envelope: Envelope) -> HttpResponse:
        url = envelope.fields["SubscribeURL"]
        topic = envelope.topic_arn
        if not self.config.auto_confirm:
            log.warning(
                "source %s: a subscription to %s awaits confirmation and auto_confirm is off: "
                "confirm it by opening its SubscribeURL %s",
                self.name,
                topic,
                url,
            )
            return _answer(200, "received, not confirmed (auto_confirm is off)")
        problem = url_problem(url, self._patterns)
        if problem is not None:
            return self._refuse(request, 403, "subscribe_url", f"SubscribeURL refused: {problem}")
        try:
            await self._fetcher.confirm(url)
        except FetchFailed as exc:
            self._count("confirm")
            self._unavailable_log.warning(
                "source %s: confirming the subscription to %s failed: %s", self.name, topic, exc
            )
            return _answer(503, "the confirmation failed; send it again", retry_after=_RETRY_AFTER)
        log.info("source %s: confirmed the subscription to %s", self.name, topic)
        return _answer(200, "subscription confirmed")

    async def _raw(self, ctx: SourceContext, request: HttpRequest) -> HttpResponse:
        token = self.config.raw_delivery_token
        if token is None:
            return self._refuse(
                request,
                403,
                "raw",
                "raw message delivery carries no signature: it is accepted only with raw_delivery_token set",
            )
        given = request.query_value("token") or _basic_password(request.header("authorization"))
        if given is None:
            self._count("raw_token")
            return _answer(
                401, "raw delivery without the token", ("WWW-Authenticate", 'Basic realm="fastconn"')
            )
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
            return self._refuse(request, 403, "raw_token", "raw delivery with a wrong token")
        topic = request.header("x-amz-sns-topic-arn")
        message_id = request.header("x-amz-sns-message-id")
        if not topic or not message_id:
            return self._refuse(
                request,
                400,
                "malformed",
                "a raw delivery needs the x-amz-sns-topic-arn and x-amz-sns-message-id headers",
            )
        if topic not in self._topics:
            return self._refuse(request, 403, "topic", f"topic {topic!r} is not in topic_arns")
        notification = Notification(
            topic_arn=topic,
            message_id=message_id,
            message=request.body,
            subscription_arn=request.header("x-amz-sns-subscription-arn"),
            raw=True,
        )
        return await self._deliver(ctx, request, notification)

    async def _deliver(
        self, ctx: SourceContext, request: HttpRequest, notification: Notification
    ) -> HttpResponse:
        try:
            messages = self._decode(notification)
        except ValueError as exc:
            return self._refuse(request, 400, "decode", f"message {notification.message_id}: {exc}")
        # Answer at once rather than hold SNS's connection: no topic map yet, or no room. SNS
        # retries a 503 on its delivery policy; nothing waits unbounded in this process.
        if not await ctx.wait_ready(0):
            return _answer(503, "topic map not loaded yet", retry_after=_RETRY_AFTER)
        if not ctx.dispatcher.has_capacity:
            self._count("busy")
            return _answer(503, "dispatcher at capacity, retry later", retry_after=_RETRY_AFTER)
        topic = notification.topic_arn

        def on_outcomes(outcomes: list[Outcome]) -> None:
            ctx.count_settled(self.name, outcomes)
            for outcome in outcomes:
                if not outcome.ok:
                    failure = outcome.first_failure()
                    self._undelivered_log.warning(
                        "source %s: message %s on %s not delivered: %s",
                        self.name,
                        outcome.message_id,
                        topic,
                        failure and f"{failure.function} -> {failure.status_label}",
                    )

        try:
            # A notification that decodes to more messages than there is room for waits, bounded.
            submitted = ctx.submit(
                self.name, messages, on_outcomes, asynchronous=self.config.asynchronous_invocation
            )
            await asyncio.wait_for(submitted, self.config.accept_timeout)
        except TimeoutError:
            self._count("busy")
            return _answer(503, "dispatcher at capacity, retry later", retry_after=_RETRY_AFTER)
        except DispatcherClosed:
            return _answer(503, "shutting down", retry_after=_RETRY_AFTER)
        except ValueError as exc:
            return self._refuse(request, 400, "malformed", f"message refused: {exc}")
        return _answer(200, "accepted", ("X-Message-Id", notification.message_id))

    # -- refusals --------------------------------------------------------------------------

    def _refuse(self, request: HttpRequest, status: int, kind: str, reason: str) -> HttpResponse:
        self._count(kind)
        self._refused_log.warning(
            "source %s: refused a delivery from %s (%s): %s", self.name, request.remote or "?", kind, reason
        )
        return _answer(status, reason)

    def _count(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            metrics = self._require_ctx().metrics
            child = self._errors[kind] = metrics.source_errors.labels(source=self.name, kind=kind)
        child.inc()


def _answer(
    status: int, text: str, *headers: tuple[str, str], retry_after: int | None = None
) -> HttpResponse:
    if retry_after is not None:
        headers = (*headers, ("Retry-After", str(retry_after)))
    return text_response(status, text, *headers)


def _basic_password(authorization: str | None) -> str | None:
    """The password of ``Authorization: Basic ...`` (SNS sends the endpoint URL's user info so)."""
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[2]
