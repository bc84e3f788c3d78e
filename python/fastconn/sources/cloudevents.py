"""``type = "cloudevents"``: CloudEvents 1.0 POSTed over HTTP (binary, structured and batched
modes) to ``path`` on the ingress server (``[server] listen``).

The route is served by the Rust core without Python per request
(``rust/core/src/ingress/cloudevents.rs``): it checks the bearer token and signature, decodes the
request with ``fastconn_core::cloudevents``, publishes each event to the topic of its ``route_by``
attribute and submits it straight into the dispatcher. Functions receive each event in
``delivery`` mode (``ce-*`` headers + data, or one JSON object), with ``X-Message-Id`` = the
event ``id``; the request's own headers (credentials, signature) never reach them. Answers: 202 +
``X-Message-Id`` (the first event's id), 400 naming the missing or invalid attribute, 401, 413,
415, 503 + ``Retry-After`` under backpressure or before the topic map. With ``reply = true``, a
single event sent with ``Prefer: reply`` gets the first function's reply event back (in the mode
it came in).

With ``reply_sink`` (``nats``, ``jetstream`` or ``kafka``: :mod:`fastconn.publish_sink`), every
reply event a function answers with is also published there, whether or not the sender asked for
it: in structured mode (``application/cloudevents+json``, the whole event in one body, so a
consumer needs no broker-specific header mapping and the bytes are the same on every broker),
``Content-Type`` set as a header where the broker has them. The core decodes the replies of a
batch of outcomes in one call; publishing runs in its own task from a bounded queue, so a slow or
unreachable broker never holds up the ingress: a reply that does not fit the queue, a publish
that fails and a malformed reply event are each logged (rate-limited) and counted in
``fastconn_source_errors_total{kind="reply_dropped"|"reply_failed"|"reply_malformed"}``;
``fastconn_replies_published_total{source}`` counts the replies the broker acknowledged.

Delivery guarantee: as for webhooks, at most once after the ``202`` (the sender retries on
``503``); a batch is reserved whole before anything is submitted, so it is accepted whole or
refused whole and a ``202`` covers every event in it. Python hears of accepted events and their
outcomes in batches (metrics, logs of undelivered events).

Async invocation (``asynchronous_invocation``, or functions marked asynchronous): the core still
serves the route; the 202 still means accepted, each event settles when its callback arrives in
the core (a failed callback is re-invoked like a failed call), and ``Prefer: reply`` waits for
the callback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from fastconn import _core
from fastconn.health import HEALTHY, SourceHealth
from fastconn.ingress import CloudEventsRoute
from fastconn.message import Outcome
from fastconn.publish_sink import PublishConfig, Publisher, PublishError, destination, publisher
from fastconn.ratelimit import RateLimitedLog
from fastconn.signatures import SignatureKeys
from fastconn.source import SourceContext
from fastconn.sources._ingress_events import IngressEventSource

__all__ = ["CONFIG_MODEL", "CloudEventsConfig", "CloudEventsSource", "create"]

log = logging.getLogger("fastconn.source.cloudevents")


class CloudEventsConfig(SignatureKeys):
    """``[[sources]] type = "cloudevents"``: CloudEvents POSTed to ``path``.

    Signature keys (``hmac_secret``, ``signature_*``) are :class:`SignatureKeys`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["cloudevents"] = "cloudevents"
    name: str = "cloudevents"
    path: str = "/cloudevents"
    """URL path of the route (exact match)."""
    route_by: Literal["type", "source", "subject"] = "type"
    """The attribute whose value is the topic (``com.github.push`` → subscribe ``com.github.*``)."""
    delivery: Literal["binary", "structured"] = "binary"
    """How functions receive the event: ``ce-*`` headers + data, or one JSON object."""
    reply: bool = False
    """Return a function's reply event to senders that ask with ``Prefer: reply``."""
    reply_sink: PublishConfig | None = None
    """Publish every reply event of a function (asked for or not) to this subject or topic."""
    max_body_bytes: int = Field(default=1048576, ge=1)
    max_batch: int = Field(default=100, ge=1, le=10000)
    """Most events in one ``application/cloudevents-batch+json`` request (more → 413)."""
    auth_token: str | None = None
    """Bearer token required in ``Authorization: Bearer <token>``; None disables the check."""
    # A CloudEvents sender is rarely GitHub: no signature header is assumed unless configured.
    signature_header: str = Field(default="X-Signature", min_length=1)
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/`` (the Python handler then serves the path);
    ``Prefer: reply`` waits for the callback."""

    @field_validator("path")
    @classmethod
    def _path_is_a_plain_absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/', e.g. /cloudevents")
        bad = next((c for c in path if c in "?#" or c <= " " or c == "\x7f"), None)
        if bad is not None:
            raise ValueError(
                f"path {path!r} contains {bad!r}: give the path alone, without query, fragment or spaces"
            )
        if path == "/webhook" or path.startswith("/webhook/") or path in ("/healthz", "/readyz", "/metrics"):
            raise ValueError(
                f"path {path!r} is taken by fastconn's own routes: choose another, e.g. /cloudevents"
            )
        return path


CONFIG_MODEL = CloudEventsConfig

REPLY_QUEUE = 10_000
"""Reply events waiting for their publish; beyond it new ones are dropped (counted, logged)."""

REPLY_BATCH = 256
"""Reply publishes in flight at once."""

STRUCTURED = "application/cloudevents+json"


def create(config: CloudEventsConfig) -> CloudEventsSource:
    return CloudEventsSource(config)


class CloudEventsSource(IngressEventSource[CloudEventsConfig]):
    event_kind = "cloudevent"

    def __init__(self, config: CloudEventsConfig) -> None:
        super().__init__(config, log)
        self._reply_log = RateLimitedLog(log, interval=10.0)
        sink = config.reply_sink
        self._publisher: Publisher | None = (
            publisher(sink, f"{self.name}-replies", "reply_sink") if sink is not None else None
        )
        self._replies: asyncio.Queue[bytes] = asyncio.Queue(REPLY_QUEUE)

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        if ctx.ingress is None:
            raise ValueError(
                f'source {self.name}: type = "cloudevents" is served by the ingress server; '
                "set [server] listen"
            )
        c = self.config
        ctx.ingress.add_cloudevents(
            CloudEventsRoute(
                name=self.name,
                path=c.path,
                max_body_bytes=c.max_body_bytes,
                max_batch=c.max_batch,
                route_by=c.route_by,
                delivery=c.delivery,
                reply=c.reply,
                auth_token=c.auth_token,
                signature=c.signature_rule(),
                on_accepted=self._on_accepted,
                on_outcomes=self._on_outcomes,
                record_payload=ctx.print_request_body,
                capture_replies=self._publisher is not None,
                asynchronous=c.asynchronous_invocation,
            )
        )

    async def start(self) -> None:
        if self._publisher is not None and self._ctx is not None:
            await self._publisher.open()
            self._ctx.supervise(f"{self.name}.replies", self._publish_replies)
        self._set_accepting(True)

    async def stop(self) -> None:
        self._set_accepting(False)

    async def close(self) -> None:
        self._closed.set()
        if self._publisher is not None:
            await self._publisher.close()

    def health(self) -> SourceHealth:
        """Nothing to lose: the sender holds an event until it has its 202."""
        return HEALTHY

    def _set_accepting(self, accepting: bool) -> None:
        self._tell_ingress(accepting=accepting)

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        super()._on_outcomes(outcomes)
        if self._ctx is not None and self._publisher is not None:
            self._queue_replies(outcomes)

    # -- reply_sink ------------------------------------------------------------------------

    def _queue_replies(self, outcomes: list[Outcome]) -> None:
        """Queues the reply events of a batch of outcomes (the first function's 2xx response
        of each, as a ``Prefer: reply`` sender gets it), decoded by the core in one call."""
        answered = [(o, o.results[0]) for o in outcomes if o.results and 200 <= o.results[0].status < 300]
        if not answered:
            return
        responses = [(r.status, list(r.headers or ()), r.body or b"") for _, r in answered]
        decoded = _core.cloudevents_replies(responses, max_body_bytes=self.config.max_body_bytes)
        dropped = malformed = 0
        for (outcome, result), (event, problem) in zip(answered, decoded, strict=True):
            if problem is not None:
                malformed += 1
                self._reply_log.warning(
                    "cloudevent %s: %s answered a malformed reply event, not published: %s",
                    outcome.message_id,
                    result.function,
                    problem,
                )
            elif event is not None:
                try:
                    self._replies.put_nowait(event)
                except asyncio.QueueFull:
                    dropped += 1
        if dropped:
            self._reply_log.warning(
                "source %s: %d reply event(s) dropped: %d wait for %s already",
                self.name,
                dropped,
                REPLY_QUEUE,
                destination(self.config.reply_sink) if self.config.reply_sink else "",
            )
        self._count_error("reply_dropped", dropped)
        self._count_error("reply_malformed", malformed)

    async def _publish_replies(self) -> None:
        """Publishes queued reply events, up to ``REPLY_BATCH`` at a time in flight (their
        acknowledgements pipelined), each counted as published once the broker acknowledged
        it; a failed one is logged and counted, not retried (the sender had its answer; a stuck
        broker must not grow the queue without bound)."""
        publisher = self._publisher
        ctx = self._ctx
        if publisher is None or ctx is None:
            return
        published = ctx.metrics.replies_published.labels(source=self.name)
        headers = (("Content-Type", STRUCTURED),)
        while True:
            batch = [await self._replies.get()]
            while len(batch) < REPLY_BATCH and not self._replies.empty():
                batch.append(self._replies.get_nowait())
            results = await asyncio.gather(
                *(publisher.publish(event, headers) for event in batch), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            for failure in failures:
                if not isinstance(failure, PublishError):
                    raise failure
                self._reply_log.warning("source %s: reply event not published: %s", self.name, failure)
            if len(batch) > len(failures):
                published.inc(len(batch) - len(failures))
            self._count_error("reply_failed", len(failures))

    def _count_error(self, kind: str, n: int) -> None:
        if n and self._ctx is not None:
            self._ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc(n)
