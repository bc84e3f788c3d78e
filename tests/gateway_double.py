"""An in-process OpenFaaS gateway double for tests.

It speaks the parts of the gateway HTTP API a connector touches, with the real gateway's
shapes and quirks (see /work/shared/reference/openfaas.md §3 and §4):

* ``GET /system/namespaces`` and ``GET /system/functions[?namespace=]``, behind HTTP Basic auth
  when credentials are configured (401 + ``WWW-Authenticate: Basic realm="Restricted"``).
* ``/function/<fn>[.<ns>][/...]``: a scriptable function (status sequence, delay, headers, body,
  hang); unknown functions get the gateway's 404 ``error finding function ...``.
* ``POST /async-function/<fn>[.<ns>]``: 202 + ``X-Call-Id`` at once (even for unknown functions,
  as the real gateway does), then a queue-worker-like background call that POSTs the result to
  ``X-Callback-Url`` with ``X-Call-Id``, ``X-Function-Status``, ``X-Duration-Seconds`` and
  ``X-Function-Name``.

Every scripted value may be a single value or a sequence; a sequence is indexed by call number and
its last element repeats (``statuses=[503, 503, 200]`` fails twice, then succeeds for good).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "DEFAULT_NAMESPACE",
    "FunctionSpec",
    "GatewayDouble",
    "RecordedRequest",
    "SentCallback",
    "async_daemon_config",
]

DEFAULT_NAMESPACE = "openfaas-fn"
"""The function namespace of a stock OpenFaaS install; what the gateway uses without ``?namespace``."""

_T = TypeVar("_T")


def _as_list(value: object) -> list[Any]:
    """Normalise a scripted value: a scalar becomes a one-element (hence repeating) list."""
    # str/bytes/Mapping are sequences or iterables too, but here they are single values.
    if value is None or isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return [value]
    if not value:
        raise ValueError("a scripted sequence must not be empty")
    return list(value)


def _pick(values: Sequence[_T], call: int) -> _T:
    """The value for call number ``call`` (0-based): past the end, the last value repeats."""
    return values[min(call, len(values) - 1)]


@dataclass
class FunctionSpec:
    """A deployed function as ``GET /system/functions`` describes it.

    ``topic`` is a shortcut for ``annotations["topic"]``, the annotation connectors subscribe by.
    """

    name: str
    namespace: str = DEFAULT_NAMESPACE
    topic: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    replicas: int = 1
    available_replicas: int = 1
    invocation_count: int = 0

    def __post_init__(self) -> None:
        if self.topic is not None:
            self.annotations = {**self.annotations, "topic": self.topic}

    def to_status(self) -> dict[str, Any]:
        """The ``FunctionStatus`` JSON object the real gateway returns for this function."""
        return {
            "name": self.name,
            "image": self.image or f"ghcr.io/openfaas/{self.name}:latest",
            "namespace": self.namespace,
            "envProcess": "",
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "replicas": self.replicas,
            "availableReplicas": self.available_replicas,
            "invocationCount": self.invocation_count,
            "createdAt": "2024-01-01T00:00:00Z",
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One request the double received, captured before any scripted delay."""

    kind: str
    """``"system"``, ``"sync"`` (``/function/``) or ``"async"`` (``/async-function/``)."""
    method: str
    path: str
    """Path and query string as received (``/system/functions?namespace=dev``)."""
    headers: CIMultiDictProxy[str]
    body: bytes
    received: float
    """``time.monotonic()`` when the request arrived."""
    function: str | None = None
    """The function name as called (``fn`` or ``fn.ns``); None for ``/system/*``."""
    namespace: str | None = None
    """The namespace the call resolved to; None for ``/system/*``."""


@dataclass(frozen=True)
class SentCallback:
    """One callback POST the double's queue worker made (a duplicate is recorded twice)."""

    url: str
    call_id: str
    function: str
    function_status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    sent: float
    """``time.monotonic()`` when the POST was started."""
    response_status: int | None
    """The receiver's status, or None when the POST failed (see ``error``)."""
    error: str | None = None


@dataclass
class _Script:
    """How one function behaves. Lists are indexed by call number (last element repeats)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    delays: list[float] = field(default_factory=lambda: [0.0])
    headers: list[Mapping[str, str]] = field(default_factory=lambda: [{}])
    bodies: list[bytes | None] = field(default_factory=lambda: [None])
    """None echoes the request body, as most sample functions do."""
    hang: bool = False
    queue_delays: list[float] = field(default_factory=lambda: [0.0])
    callback_delays: list[float] = field(default_factory=lambda: [0.0])
    callback_copies: list[int] = field(default_factory=lambda: [1])
    """0 loses the callback, 2+ duplicates it (at-least-once delivery)."""
    accept_statuses: list[int] = field(default_factory=lambda: [202])
    """The answer of ``/async-function/`` itself per request: 202 queues the call; anything else
    (a gateway whose queue is unavailable answers 5xx) queues nothing."""


@dataclass
class _FunctionState:
    script: _Script = field(default_factory=_Script)
    calls: int = 0
    """Function invocations so far (sync and async share it: async runs the same function)."""
    async_calls: int = 0
    """Async calls queued (202) so far; indexes the queue/callback knobs."""
    async_requests: int = 0
    """``/async-function/`` requests so far, queued or not; indexes ``accept_statuses``."""


@dataclass(frozen=True)
class _Result:
    status: int
    headers: Mapping[str, str]
    body: bytes
    duration: float


class GatewayDouble:
    """A scriptable OpenFaaS gateway on ``127.0.0.1``; see the module docstring.

    Usage::

        async with GatewayDouble([FunctionSpec("echo", topic="orders")]) as gw:
            gw.script("echo", statuses=[503, 200], headers={"Retry-After": "1"})
            ... talk to gw.url ...
    """

    def __init__(
        self,
        functions: Sequence[FunctionSpec] = (),
        *,
        credentials: tuple[str, str] | None = None,
        namespaces: Sequence[str] | None = None,
        path_prefix: str = "",
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.credentials = credentials
        """``(user, password)`` required on ``/system/*``; None disables auth."""
        self.namespaces_supported = True
        """False makes ``/system/namespaces`` 404, like providers without namespace support."""
        self.namespaces_body: bytes | None = None
        """Raw ``/system/namespaces`` body override (e.g. ``b""`` or ``b"null"``)."""
        self.functions_body: bytes | None = None
        """Raw ``/system/functions`` body override (e.g. a huge pre-serialised listing)."""
        self.down = False
        """True makes every ``/system/*`` request fail with 500 (the provider is unreachable)."""
        self.system_delay = 0.0
        """Seconds every ``/system/*`` request takes before answering (a slow gateway)."""
        self._functions: dict[tuple[str, str], FunctionSpec] = {}
        self._namespaces = list(namespaces) if namespaces is not None else None
        self._states: dict[tuple[str, str], _FunctionState] = {}
        self._prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
        self._host = host
        self._ssl_context = ssl_context
        """Serve https with this context (``url`` then says ``https://``)."""
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Hung handlers wait on this; it is swapped for a fresh one on every release.
        self._hang_release = asyncio.Event()
        self.requests: list[RecordedRequest] = []
        self.callbacks: list[SentCallback] = []
        self._callback_sent = asyncio.Condition()
        self.set_functions(functions)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (0 = a free one, or the previous port after a ``stop()``)."""
        if self._runner is not None:
            raise RuntimeError("gateway double already running")
        runner = web.AppRunner(self._build_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, port or self._port, ssl_context=self._ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        self._client = aiohttp.ClientSession()

    async def stop(self) -> None:
        """Stop listening; pending background callbacks are dropped, hung requests released."""
        if self._runner is None:
            return
        self.release_hangs()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> GatewayDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("gateway double not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL including the path prefix, without a trailing slash."""
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self.port}{self._prefix}"

    # ----------------------------------------------------------------- test controls

    def set_functions(self, functions: Sequence[FunctionSpec]) -> None:
        """Replace the deployed functions; scripts and call counters are kept."""
        self._functions = {(spec.name, spec.namespace): spec for spec in functions}

    def set_namespaces(self, namespaces: Sequence[str] | None) -> None:
        """Fix the namespace list; None derives it from the functions (plus ``openfaas-fn``)."""
        self._namespaces = list(namespaces) if namespaces is not None else None

    def set_down(self, down: bool = True) -> None:
        """Make every ``/system/*`` request fail with 500 (True) or work again (False)."""
        self.down = down

    def script(
        self,
        name: str,
        *,
        statuses: int | Sequence[int] = 200,
        delay: float | Sequence[float] = 0.0,
        headers: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        body: bytes | str | Sequence[bytes | str | None] | None = None,
        hang: bool = False,
        queue_delay: float | Sequence[float] = 0.0,
        callback_delay: float | Sequence[float] = 0.0,
        callback_copies: int | Sequence[int] = 1,
        accept_statuses: int | Sequence[int] = 202,
    ) -> None:
        """Set how function ``name`` (``fn`` or ``fn.ns``) behaves from its next call on.

        ``body=None`` echoes the request body. ``hang`` holds every call until
        :meth:`release_hangs` or :meth:`stop`. ``queue_delay`` is the async queueing delay before
        the function runs, ``callback_delay`` the delay before the callback POST, and
        ``callback_copies`` how many times the callback is POSTed (0 = lost, 2 = duplicated).
        ``accept_statuses`` is what ``/async-function/`` answers per request (202 = queued).
        The call counter restarts, so the new sequences start from their first element.
        """
        script = _Script(
            statuses=_as_list(statuses),
            delays=_as_list(delay),
            headers=_as_list(headers or {}),
            bodies=[b.encode() if isinstance(b, str) else b for b in _as_list(body)],
            hang=hang,
            queue_delays=_as_list(queue_delay),
            callback_delays=_as_list(callback_delay),
            callback_copies=_as_list(callback_copies),
            accept_statuses=_as_list(accept_statuses),
        )
        self._states[self._resolve(name)] = _FunctionState(script=script)

    def release_hangs(self) -> None:
        """Let every currently hung call answer with its scripted status."""
        self._hang_release.set()
        self._hang_release = asyncio.Event()

    def reset_requests(self) -> None:
        """Forget recorded requests and callbacks (scripts and counters are kept)."""
        self.requests.clear()
        self.callbacks.clear()

    def requests_for(self, name: str) -> list[RecordedRequest]:
        """Recorded sync and async calls of function ``name`` (``fn`` means ``fn.openfaas-fn``)."""
        key = self._resolve(name)
        return [r for r in self.requests if r.function is not None and self._resolve(r.function) == key]

    def calls(self, name: str) -> int:
        """How many times function ``name`` ran (sync calls plus completed async dispatches)."""
        return self._state(name).calls

    async def wait_callbacks(self, count: int) -> list[SentCallback]:
        """Wait until at least ``count`` callbacks were sent; return them all.

        Unbounded: wrap it in ``asyncio.timeout()``.
        """
        async with self._callback_sent:
            await self._callback_sent.wait_for(lambda: len(self.callbacks) >= count)
        return list(self.callbacks)

    # ----------------------------------------------------------------- routing

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # the gateway takes large bodies
        p = self._prefix
        app.router.add_get(f"{p}/system/namespaces", self._system(self._list_namespaces))
        app.router.add_get(f"{p}/system/functions", self._system(self._list_functions))
        for route in ("/function/{name}", "/function/{name}/{tail:.*}"):
            app.router.add_route("*", p + route, self._handle_sync)
        app.router.add_post(p + "/async-function/{name}", self._handle_async)
        return app

    def _system(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap a ``/system/*`` handler with recording, basic auth and the "down" switch."""

        async def wrapped(request: web.Request) -> web.Response:
            await self._record(request, "system")
            await self._wait(self.system_delay)
            if not self._authorised(request):
                return web.Response(
                    status=401,
                    text="invalid credentials",
                    headers={"WWW-Authenticate": 'Basic realm="Restricted"'},
                )
            if self.down:
                return web.Response(status=500, text="gateway double is down")
            return await handler(request)

        return wrapped

    def _authorised(self, request: web.Request) -> bool:
        if self.credentials is None:
            return True
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (user, password) == self.credentials

    # ----------------------------------------------------------------- /system/*

    def _served_namespaces(self) -> list[str]:
        if self._namespaces is not None:
            return list(self._namespaces)
        return sorted({DEFAULT_NAMESPACE} | {ns for _, ns in self._functions})

    async def _list_namespaces(self, request: web.Request) -> web.Response:
        if not self.namespaces_supported:
            return web.Response(status=404, text="404 page not found")
        if self.namespaces_body is not None:
            return web.Response(body=self.namespaces_body, content_type="application/json")
        return web.json_response(self._served_namespaces())

    async def _list_functions(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace") or DEFAULT_NAMESPACE
        # The real provider refuses namespaces it does not manage rather than returning [].
        if self.namespaces_supported and namespace not in self._served_namespaces():
            return web.Response(status=400, text=f"namespace {namespace} is not allowed")
        if self.functions_body is not None:
            return await self._stream(request, self.functions_body)
        statuses = [spec.to_status() for (_, ns), spec in self._functions.items() if ns == namespace]
        return web.json_response(statuses)

    @staticmethod
    async def _stream(request: web.Request, body: bytes) -> web.StreamResponse:
        """``body`` written in pieces: a huge listing must not stall this (the test's) event loop
        for the write of the whole, which a real gateway in another process would not."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        view = memoryview(body)
        for start in range(0, len(body), 256 * 1024):
            await response.write(view[start : start + 256 * 1024])
        await response.write_eof()
        return response

    # ----------------------------------------------------------------- /function/, /async-function/

    async def _handle_sync(self, request: web.Request) -> web.Response:
        called_as = request.match_info["name"]
        call_id = request.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_ns = time.time_ns()
        recorded = await self._record(request, "sync", called_as)
        result = await self._run_function(called_as, recorded.body, request.headers)
        headers = {
            **result.headers,
            "X-Call-Id": call_id,
            "X-Start-Time": str(start_ns),
            "X-Duration-Seconds": f"{result.duration:f}",
        }
        return web.Response(status=result.status, body=result.body, headers=headers)

    async def _handle_async(self, request: web.Request) -> web.Response:
        called_as = request.match_info["name"]
        recorded = await self._record(request, "async", called_as)
        callback_url = request.headers.get("X-Callback-Url")
        if callback_url is not None and not _is_http_url(callback_url):
            return web.Response(status=400, text=f"X-Callback-Url is not a valid URL: {callback_url}")
        # Like the gateway's CallID middleware: honour the caller's id, else mint one.
        call_id = request.headers.get("X-Call-Id") or str(uuid.uuid4())
        state = self._state(called_as)
        accept = _pick(state.script.accept_statuses, state.async_requests)
        state.async_requests += 1
        if accept != 202:
            return web.Response(status=accept, text="the async queue is unavailable")
        attempt = state.async_calls
        state.async_calls += 1
        task = asyncio.create_task(self._complete_async(called_as, call_id, recorded, callback_url, attempt))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return web.Response(status=202, headers={"X-Call-Id": call_id, "X-Start-Time": str(time.time_ns())})

    async def _complete_async(
        self,
        called_as: str,
        call_id: str,
        recorded: RecordedRequest,
        callback_url: str | None,
        attempt: int,
    ) -> None:
        """The queue worker's part: wait, run the function, POST the result back."""
        script = self._state(called_as).script
        await asyncio.sleep(_pick(script.queue_delays, attempt))
        result = await self._run_function(called_as, recorded.body, recorded.headers)
        if callback_url is None:
            return
        await asyncio.sleep(_pick(script.callback_delays, attempt))
        headers = {
            **result.headers,
            "X-Call-Id": call_id,
            "X-Function-Status": str(result.status),
            "X-Duration-Seconds": f"{result.duration:f}",
            "X-Function-Name": called_as,
            "User-Agent": "queue-worker/gateway-double",
        }
        for _ in range(_pick(script.callback_copies, attempt)):
            await self._post_callback(callback_url, call_id, called_as, result, headers)

    async def _post_callback(
        self, url: str, call_id: str, called_as: str, result: _Result, headers: Mapping[str, str]
    ) -> None:
        assert self._client is not None, "callbacks only run while started"
        sent = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with self._client.post(url, data=result.body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = repr(exc)
        self.callbacks.append(
            SentCallback(
                url=url,
                call_id=call_id,
                function=called_as,
                function_status=result.status,
                headers=CIMultiDictProxy(CIMultiDict(headers)),
                body=result.body,
                sent=sent,
                response_status=status,
                error=error,
            )
        )
        async with self._callback_sent:
            self._callback_sent.notify_all()

    async def _run_function(self, called_as: str, body: bytes, request_headers: Mapping[str, str]) -> _Result:
        """Invoke the scripted function once (what the provider + function would do)."""
        started = time.monotonic()
        name, namespace = self._resolve(called_as)
        if (name, namespace) not in self._functions:
            text = f"error finding function {name}.{namespace}: server returned non-200 status code"
            return _Result(404, {}, text.encode(), time.monotonic() - started)
        state = self._state(called_as)
        call = state.calls
        state.calls += 1
        script = state.script
        await self._wait(math.inf if script.hang else _pick(script.delays, call))
        headers = dict(_pick(script.headers, call))
        scripted_body = _pick(script.bodies, call)
        if scripted_body is None and "Content-Type" in request_headers:
            headers.setdefault("Content-Type", request_headers["Content-Type"])
        payload = body if scripted_body is None else scripted_body
        return _Result(_pick(script.statuses, call), headers, payload, time.monotonic() - started)

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until hung calls are released."""
        if delay <= 0:
            return
        release = self._hang_release
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), None if math.isinf(delay) else delay)

    # ----------------------------------------------------------------- bookkeeping

    async def _record(self, request: web.Request, kind: str, called_as: str | None = None) -> RecordedRequest:
        received = time.monotonic()
        body = await request.read()
        namespace = self._resolve(called_as)[1] if called_as is not None else None
        recorded = RecordedRequest(
            kind=kind,
            method=request.method,
            path=request.path_qs,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            received=received,
            function=called_as,
            namespace=namespace,
        )
        self.requests.append(recorded)
        return recorded

    @staticmethod
    def _resolve(called_as: str) -> tuple[str, str]:
        """``fn.ns`` → (fn, ns); ``fn`` → (fn, openfaas-fn). The gateway splits at the last dot."""
        name, dot, namespace = called_as.rpartition(".")
        return (name, namespace) if dot else (called_as, DEFAULT_NAMESPACE)

    def _state(self, name: str) -> _FunctionState:
        return self._states.setdefault(self._resolve(name), _FunctionState())


def _is_http_url(value: str) -> bool:
    try:
        url = URL(value)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def async_daemon_config(
    gateway: GatewayDouble, *sources: Mapping[str, Any], **dispatch: Any
) -> dict[str, Any]:
    """A daemon configuration invoking ``gateway``'s functions asynchronously for ``sources``
    (each sets ``asynchronous_invocation``), with fast retries; ``dispatch`` adds to or overrides
    the ``[dispatch]`` table (``max_attempts=1`` leaves a failed callback to the source)."""
    return {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s", **dispatch},
        "sources": [{**source, "asynchronous_invocation": True} for source in sources],
    }
