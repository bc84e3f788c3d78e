"""``type = "webhook"``: events POSTed over HTTP (GitHub, IFTTT, any service with webhooks).

``POST /webhook/<topic>`` on the admin server. The body is the payload; the request's headers
(except hop-by-hop and auth ones) pass through to the function. Answers:

* 202 + ``X-Message-Id`` once accepted for dispatch (the sender may forget it: fastconn retries);
* 503 + ``Retry-After`` when the dispatcher is full (backpressure reaches the sender);
* 413 over ``max_body_bytes``; 401 on a wrong bearer token or HMAC signature;
* with ``?wait=true``: the first function's status and body once every function answered.

After a 202 the sender has nothing to acknowledge: a message that fails for good is counted in
``fastconn_messages_failed_total`` and logged, as for any at-most-once source.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable
from typing import Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from fastconn._compat import raise_client_max_size
from fastconn.errors import DispatcherClosed
from fastconn.message import Message, Outcome, Verdict
from fastconn.source import SourceContext

log = logging.getLogger("fastconn.source.webhook")

T = TypeVar("T")

# Headers that describe the HTTP hop or carry the sender's credentials: never forwarded.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "authorization",
        "expect",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
    }
)


class WebhookConfig(BaseModel):
    """``[[sources]] type = "webhook"``: accept events POSTed to the built-in HTTP server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"] = "webhook"
    name: str = "webhook"
    max_body_bytes: int = Field(default=1048576, ge=1)
    auth_token: str | None = None
    """Bearer token required in ``Authorization: Bearer <token>``; None disables the check."""
    hmac_secret: str | None = None
    """Shared secret for GitHub-style ``X-Hub-Signature-256`` HMAC verification; None disables it."""
    signature_header: str = "X-Hub-Signature-256"
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; ``?wait=true`` waits for the callback."""


CONFIG_MODEL = WebhookConfig


def create(config: WebhookConfig) -> WebhookSource:
    return WebhookSource(config)


class WebhookSource:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._accepting = False
        # Set by stop() / close(): requests still waiting for the topic map / for their
        # outcome get a 503 then, so a pending request cannot hold up the shutdown.
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.app.router.add_post("/webhook/{topic:.+}", self._handle)
        # Larger bodies are refused by our own check with a clear 413, not by aiohttp's default.
        raise_client_max_size(ctx.app, self.config.max_body_bytes + 1)

    async def start(self) -> None:
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        self._stopping.set()

    async def close(self) -> None:
        self._closed.set()

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
        body = await self._read_limited(request)
        if body is None:
            return _error(413, f"body exceeds max_body_bytes ({self.config.max_body_bytes})")
        denied = self._check_signature(request, body)
        if denied:
            return denied
        if not ctx.dispatcher.has_capacity:
            return _error(503, "dispatcher at capacity, retry later", retry_after=1)
        topic = request.match_info["topic"]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        if self.config.signature_header.lower() in {k.lower() for k, _ in headers}:
            headers = [(k, v) for k, v in headers if k.lower() != self.config.signature_header.lower()]
        # The id is made here so the 202 can carry it; it stays the same across retries.
        message = Message(topic, body, headers, message_id=uuid.uuid4().hex)
        wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
        # Ready already (the usual case) without tasks; else wait, unless shutdown comes first.
        ready = await ctx.wait_ready(0) or await _unless(ctx.wait_ready(ctx.startup_wait), self._stopping)
        if ready is None:
            return _error(503, "shutting down", retry_after=1)
        if not ready:
            return _error(503, "topic map not loaded yet", retry_after=1)
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[Outcome] = loop.create_future()

        def on_outcomes(outcomes: list[Outcome]) -> None:
            ctx.count_settled(self.name, outcomes)
            for outcome in outcomes:
                if not outcome.ok:
                    failure = outcome.first_failure()
                    log.warning(
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

    def _check_token(self, request: web.Request) -> web.Response | None:
        token = self.config.auth_token
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token", www_authenticate='Bearer realm="fastconn"')
        return None

    def _check_signature(self, request: web.Request, body: bytes) -> web.Response | None:
        secret = self.config.hmac_secret
        if secret is None:
            return None
        given = request.headers.get(self.config.signature_header, "")
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, f"missing or wrong {self.config.signature_header} signature")
        return None

    async def _read_limited(self, request: web.Request) -> bytes | None:
        """Reads the body, giving up as soon as it passes the limit (chunked bodies too)."""
        limit = self.config.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


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
