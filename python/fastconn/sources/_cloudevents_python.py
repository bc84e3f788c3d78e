"""The CloudEvents endpoint in Python, served instead of the core's route while its events need
the async-invocation layer (the source's ``asynchronous_invocation``, or functions invoked
asynchronously): the core cannot wait for a callback. It decodes with the core's codec
(``_core.cloudevents_calls``) and checks signatures with the shared checker, so it answers as
the core's route does; ``Prefer: reply`` then waits for the callback."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fastconn import _core
from fastconn.errors import DispatcherClosed
from fastconn.http_routes import HttpRequest, HttpResponse, Route, text_response
from fastconn.ingress_answers import json_error, unless, waited_response
from fastconn.message import Message, Outcome, OutcomeCallback
from fastconn.ratelimit import RateLimitedLog
from fastconn.signatures import signature_problem
from fastconn.source import SourceContext

if TYPE_CHECKING:
    from fastconn.sources.cloudevents import CloudEventsConfig

__all__ = ["PythonCloudEvents"]

log = logging.getLogger("fastconn.source.cloudevents")


class PythonCloudEvents:
    """``POST <path>`` of one CloudEvents source, in Python."""

    def __init__(
        self,
        config: CloudEventsConfig,
        context: Callable[[], SourceContext | None],
        on_outcomes: OutcomeCallback,
        closed: asyncio.Event,
    ) -> None:
        self.config = config
        self._context = context
        self._on_outcomes = on_outcomes
        self._closed = closed
        self.accepting = False
        self._malformed_log = RateLimitedLog(log, interval=10.0)

    def route(self) -> Route:
        c = self.config
        return Route("POST", c.path, self.handle, max_body_bytes=c.max_body_bytes, name=c.name)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        ctx, c = self._context(), self.config
        if ctx is None or not self.accepting:
            return json_error(503, "not accepting events (starting or shutting down)", retry_after=1)
        if c.auth_token is not None:
            given = (request.header("Authorization") or "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {c.auth_token}".encode()):
                return json_error(
                    401, "missing or wrong bearer token", www_authenticate='Bearer realm="fastconn"'
                )
        # Values that are not UTF-8 become U+FFFD: they can match nothing, and decode as the core's.
        headers = [
            (name, value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            for name, value in request.headers
        ]
        problem = signature_problem(c, headers, request.body)
        if problem is not None:
            return json_error(401, problem)
        try:
            calls = _core.cloudevents_calls(
                headers,
                request.body,
                route_by=c.route_by,
                delivery=c.delivery,
                max_body_bytes=c.max_body_bytes,
                max_batch=c.max_batch,
            )
        except ValueError as exc:
            status, reason = _refusal(exc)
            if status == 400:
                self._malformed_log.warning(
                    "source %s: bad request from %s: %s", c.name, request.remote or "?", reason
                )
            return json_error(status, reason)
        if not calls:
            return text_response(202, "accepted\n")
        if not await ctx.wait_ready(0):
            return json_error(503, "topic map not loaded yet", retry_after=1)
        if not ctx.dispatcher.has_capacity:
            return json_error(503, "dispatcher at capacity, retry later", retry_after=1)
        messages = [Message(topic, body, list(h), message_id=mid) for topic, mid, h, body in calls]
        first_id = messages[0].message_id or ""
        wait = c.reply and len(messages) == 1 and _wants_reply(headers)
        settled: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def on_outcomes(outcomes: list[Outcome]) -> None:
            self._on_outcomes(outcomes)
            if wait and outcomes and not settled.done():
                settled.set_result(outcomes[0])

        try:
            await ctx.submit(c.name, messages, on_outcomes, capture=wait, asynchronous=True)
        except DispatcherClosed:
            return json_error(503, "shutting down", retry_after=1)
        except ValueError as exc:
            return json_error(400, f"event refused: {exc}")
        if not wait:
            return HttpResponse(202, (("X-Message-Id", first_id),), b"accepted\n")
        outcome = await unless(settled, self._closed)
        if outcome is None:
            return json_error(
                503, "shut down before every function answered", retry_after=1, message_id=first_id
            )
        return self._reply(outcome, first_id, _reply_mode(request.header("Content-Type")))

    def _reply(self, outcome: Outcome, message_id: str, mode: str) -> HttpResponse:
        """The first function's reply event, 202 when it answered none, 502 when it answered a
        malformed one; a failed call is answered as ``?wait=true`` answers it."""
        first = outcome.results[0] if outcome.results else None
        if first is None or not 200 <= first.status < 300:
            return waited_response(outcome, message_id)
        try:
            reply = _core.cloudevents_reply(
                first.status,
                list(first.headers or ()),
                first.body or b"",
                mode=mode,
                max_body_bytes=self.config.max_body_bytes,
            )
        except ValueError as exc:
            reason = f"{first.function} answered a malformed reply event (the event was delivered): "
            return json_error(502, reason + _refusal(exc)[1], message_id=message_id)
        if reply is None:
            return HttpResponse(202, (("X-Message-Id", message_id),), b"accepted\n")
        status, headers, body = reply
        return HttpResponse(status, [*headers, ("X-Message-Id", message_id)], body)


def _refusal(exc: ValueError) -> tuple[int, str]:
    """The (status, message) a core codec refusal carries (its arguments)."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        return exc.args[0], str(exc.args[1])
    return 400, str(exc)


def _wants_reply(headers: Sequence[tuple[str, str]]) -> bool:
    """``Prefer: reply`` among the request's preferences (as the core reads it)."""
    return any(
        preference.split(";", 1)[0].strip().lower() == "reply"
        for name, value in headers
        if name.lower() == "prefer"
        for preference in value.split(",")
    )


def _reply_mode(content_type: str | None) -> str:
    """A reply goes back in binary mode to a binary event, structured otherwise (a batch of one
    included), as the core's route answers."""
    essence = (content_type or "").split(";", 1)[0].strip().lower()
    return "structured" if essence.startswith("application/cloudevents") else "binary"
