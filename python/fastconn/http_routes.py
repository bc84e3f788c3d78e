"""HTTP routes a source serves with its own Python logic, independent of the HTTP server.

A source that needs a request handler of its own (an SNS subscription endpoint, a provider's
webhook shape) declares a :class:`Route` in ``register`` with ``ctx.add_route(route)``. The
handler sees plain data (:class:`HttpRequest`, the body already read within the route's limit)
and answers plain data (:class:`HttpResponse`): it never touches the server's objects, so the
same handler runs behind the ingress server in the Rust core, which hands such requests to
Python in batches (:mod:`fastconn.ingress`), and behind an aiohttp application
(:func:`add_to_aiohttp`: tests, a bare dispatcher).

What every route gets without writing it: the body limit (413 before and while reading), a
method check (405), a 400 for a body that did not arrive whole, and a 500 without a traceback
to the client (logged once, rate-limited) when the handler raises: per-request failures are
answers, not crashes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fastconn.http_body import IncompleteBody, read_at_most
from fastconn.ratelimit import RateLimitedLog

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "HttpRequest",
    "HttpResponse",
    "Route",
    "RouteHandler",
    "add_to_aiohttp",
    "serve",
    "text_response",
]

log = logging.getLogger("fastconn.http")

DEFAULT_MAX_BODY_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request, read whole. Header names keep their case; :attr:`header` looks them up
    case-insensitively."""

    method: str
    path: str
    """The decoded path, without the query."""
    query: Sequence[tuple[str, str]]
    """Decoded query parameters in order (a name may repeat)."""
    headers: Sequence[tuple[str, str]]
    body: bytes
    remote: str = ""
    """The peer's address (``host:port``), for logs."""
    body_too_large: bool = False
    """The body was over the route's limit and not read (only for routes with
    ``oversized_to_handler``; the handler decides the answer)."""
    _index: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        index = self._index
        if not index:
            index = CIMultiDictProxy(CIMultiDict(self.headers))
            object.__setattr__(self, "_index", index)
        return index.get(name)

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        return next((value for key, value in self.query if key == name), None)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


RouteHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """``method path`` (an exact path, no patterns) answered by ``handler``."""

    method: str
    path: str
    handler: RouteHandler
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    name: str = ""
    """Who serves it (the source's name), for logs and conflicts."""
    prefix: bool = False
    """``path`` is a prefix: the route serves every longer path under it (``/callback/``)."""
    oversized_to_handler: bool = False
    """A body over ``max_body_bytes`` reaches the handler (unread, ``body_too_large``) instead
    of a 413 answered for it: for handlers that must act on it (fail a pending call at once)."""


def text_response(status: int, text: str, *headers: tuple[str, str]) -> HttpResponse:
    """A plain-text answer (a newline is added): what every error answer of a route looks like."""
    content_type = ("Content-Type", "text/plain; charset=utf-8")
    return HttpResponse(status, (content_type, *headers), (text + "\n").encode())


_handler_errors = RateLimitedLog(log, interval=10.0)


async def serve(route: Route, request: HttpRequest) -> HttpResponse:
    """``route``'s answer to ``request``; a handler that raises answers 500 (logged, rate-limited)."""
    try:
        return await route.handler(request)
    except Exception as exc:  # a bug in one handler answers 500; the server keeps serving
        _handler_errors.warning(
            "route %s %s (%s) failed: %s: %s", route.method, route.path, route.name, type(exc).__name__, exc
        )
        return text_response(500, "internal error: the handler failed (see the daemon's log)")


def add_to_aiohttp(
    app: web.Application,
    route: Route,
    *,
    track_header: str = "",
    receiving: Callable[[str, bool], None] | None = None,
) -> None:
    """Serves ``route`` on an aiohttp application (the admin server). With ``track_header``,
    ``receiving(value, True)`` is called with the header's value before the request's body is
    read and ``receiving(value, False)`` once it is."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if route.method not in (request.method, "*"):
            return _to_aiohttp(text_response(405, f"use {route.method}", ("Allow", route.method)))
        tracked = request.headers.get(track_header, "") if track_header and receiving is not None else ""
        if tracked and receiving is not None:
            receiving(tracked, True)
        try:
            body = await read_at_most(request, route.max_body_bytes)
        except IncompleteBody as exc:
            return _to_aiohttp(text_response(400, str(exc)))
        finally:
            if tracked and receiving is not None:
                receiving(tracked, False)
        if body is None and not route.oversized_to_handler:
            return _to_aiohttp(
                text_response(413, f"the body is over {route.max_body_bytes} bytes (max_body_bytes)")
            )
        peer = request.transport.get_extra_info("peername") if request.transport else None
        plain = HttpRequest(
            method=request.method,
            path=request.path,
            query=tuple(request.query.items()),
            headers=tuple(request.headers.items()),
            body=body or b"",
            remote=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "",
            body_too_large=body is None,
        )
        return _to_aiohttp(await serve(route, plain))

    # [\s\S]: a prefix route serves any tail, newlines (percent-encoded) included.
    path = route.path + r"{tail:[\s\S]+}" if route.prefix else route.path
    app.router.add_route("*", path, handle)


def _to_aiohttp(response: HttpResponse) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict(response.headers)
    return web.Response(status=response.status, headers=headers, body=response.body)
