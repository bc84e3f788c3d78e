"""The function registry: which functions exist and which topics each one subscribes to.

Functions come from two places: static ``[[functions]]`` entries in the configuration
(:func:`static_targets`) and the OpenFaaS gateway's function listing (:class:`GatewayRegistry`),
where a function subscribes through its ``topic`` annotation exactly as with the OpenFaaS
connector-sdk. :class:`TopicMapSync` re-lists the gateway periodically and hands every changed
table to the router.

Deliberate differences from connector-sdk (see /work/shared/reference/openfaas.md §1.2):

* A failed listing keeps the last good table and retries with backoff; the SDK exits the process.
* Listing has a timeout and keeps any path prefix of the gateway URL; the SDK has neither.
* A topic listed twice in one annotation subscribes the function once, not twice.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

import aiohttp
from yarl import URL

from fastconn import _core
from fastconn.backoff import doubling
from fastconn.durations import parse_duration
from fastconn.errors import ConfigError, RegistryError
from fastconn.functions import FunctionTarget
from fastconn.json_list import decode_json_list, utf8_text
from fastconn.supervise import Supervisor

__all__ = [
    "ASYNC_ANNOTATION",
    "CRON_POLICY_PREFIX",
    "CRON_TOPIC",
    "MAX_INFLIGHT_ANNOTATION",
    "SCHEDULE_ANNOTATION",
    "TIMEOUT_ANNOTATION",
    "TIMEZONE_ANNOTATION",
    "TOPIC_ANNOTATION",
    "GatewayRegistry",
    "StaticFunction",
    "TopicMapSync",
    "parse_topics",
    "static_targets",
]

TOPIC_ANNOTATION: Final = "topic"
"""The annotation connector-sdk subscribes by; kept so existing functions work unchanged."""
ASYNC_ANNOTATION: Final = "fastconn.async"
"""``"true"`` invokes the function through ``/async-function/``."""
MAX_INFLIGHT_ANNOTATION: Final = "fastconn.max_inflight"
"""Per-function in-flight bound (a positive integer)."""
TIMEOUT_ANNOTATION: Final = "fastconn.timeout"
"""Per-request timeout as a Go duration (``"5s"``) or a number of seconds."""

SCHEDULE_ANNOTATION: Final = "schedule"
"""A cron schedule (OpenFaaS cron-connector), fired by a ``cron`` source."""
TIMEZONE_ANNOTATION: Final = "timezone"
"""The IANA zone of ``schedule``."""
CRON_POLICY_PREFIX: Final = "fastconn.cron."
"""Per-function cron policies: ``fastconn.cron.concurrency``, ``.catch_up``, ``.max_catch_up``,
``.jitter``."""
CRON_TOPIC: Final = "cron-function"
"""The topic whose subscribers' ``schedule`` counts (OpenFaaS cron-connector); fires carry it."""

_INITIAL_BACKOFF: Final = 0.5
# Enough of an error body to see what a proxy or gateway said, without flooding the log.
_ERROR_BODY_CHARS: Final = 200
DEFAULT_MAX_LISTING_BYTES: Final = 32 * 1024 * 1024
# Bodies above this are decoded in a worker thread (a few milliseconds of parsing on the loop
# below it); the function table is then built with a yield to the loop every few entries.
_OFF_LOOP_BYTES: Final = 256 * 1024
_ENTRIES_PER_YIELD: Final = 500


def parse_topics(annotation: str, delimiter: str) -> tuple[str, ...]:
    """Split a ``topic`` annotation into topics: trimmed, empties dropped, duplicates removed.

    An empty ``delimiter`` means no split (the whole annotation is one topic), as in connector-sdk.
    """
    parts = annotation.split(delimiter) if delimiter else [annotation]
    # dict.fromkeys de-duplicates while keeping annotation order, so the result is stable.
    return tuple(dict.fromkeys(topic for topic in (part.strip() for part in parts) if topic))


def _invoke_urls(gateway_url: str, label: str) -> tuple[str, str]:
    """Synchronous and asynchronous invoke URLs of function ``label`` (``fn`` or ``fn.ns``)."""
    base = gateway_url.rstrip("/")
    return f"{base}/function/{label}", f"{base}/async-function/{label}"


def _label(name: str, namespace: str | None) -> str:
    """The gateway's spelling of a function: ``fn.ns``, or bare ``fn`` when the namespace is unknown."""
    return f"{name}.{namespace}" if namespace else name


# ---------------------------------------------------------------------------- static functions


class StaticFunction(Protocol):
    """What :func:`static_targets` reads from a configured ``[[functions]]`` entry."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str | None: ...
    @property
    def topics(self) -> Sequence[str]: ...
    @property
    def namespace(self) -> str | None: ...
    @property
    def max_inflight(self) -> int | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def asynchronous(self) -> bool: ...
    @property
    def schedule(self) -> str | None: ...
    @property
    def timezone(self) -> str | None: ...


def static_targets(functions: Iterable[StaticFunction], gateway_url: str | None) -> list[FunctionTarget]:
    """Targets for statically configured functions, in configuration order.

    Without an explicit ``url`` the function is invoked through the gateway
    (``<gw>/function/<name>[.<ns>]``); only such gateway-derived targets get an ``async_url``,
    because a plain URL has no OpenFaaS async form. Raises :class:`ConfigError` for an entry
    that has no URL and no gateway to derive one from, or that asks for asynchronous invocation
    without a gateway-derived URL.
    """
    return [_static_target(index, entry, gateway_url) for index, entry in enumerate(functions)]


def _static_target(index: int, entry: StaticFunction, gateway_url: str | None) -> FunctionTarget:
    label = _label(entry.name, entry.namespace)
    location = f"functions[{index}]"
    if entry.url is not None:
        if entry.asynchronous:
            raise ConfigError.single(
                f"{location}.asynchronous", "needs a gateway-derived URL (remove url)", entry.url
            )
        url, async_url = entry.url, None
    elif gateway_url is not None:
        url, async_url = _invoke_urls(gateway_url, label)
    else:
        raise ConfigError.single(f"{location}.url", "required when no gateway is configured")
    # A scheduled entry subscribes to the cron topic itself: that is how its fires reach it.
    topics = (*entry.topics, CRON_TOPIC) if entry.schedule is not None else tuple(entry.topics)
    return FunctionTarget(
        name=label,
        topics=tuple(dict.fromkeys(topics)),
        url=url,
        async_url=async_url,
        max_inflight=entry.max_inflight,
        timeout=entry.timeout,
        asynchronous=entry.asynchronous,
        schedule=entry.schedule,
        timezone=entry.timezone,
    )


# ---------------------------------------------------------------------------- gateway listing


class GatewayRegistry:
    """Lists functions from an OpenFaaS gateway and turns the subscribed ones into targets.

    ``gateway_url`` is the gateway base URL; a path prefix (``https://host/openfaas``) is kept for
    both ``/system/*`` and ``/function/*``. ``credentials`` is ``(user, password)`` for HTTP Basic
    auth on ``/system/*``. ``listing_timeout`` bounds each listing request. ``namespaces``, when
    given, replaces discovery through ``/system/namespaces`` (``""`` = the gateway's default).
    The ``session`` is borrowed if passed in; otherwise one is created on first use and closed by
    :meth:`close`. ``ssl_context`` (from :meth:`GatewayConfig.ssl_context`) replaces the default
    verification of an ``https://`` gateway (private CA, client certificate).
    """

    def __init__(
        self,
        gateway_url: str,
        *,
        credentials: tuple[str, str] | None = None,
        topic_delimiter: str = ",",
        listing_timeout: float = 10.0,
        namespaces: Sequence[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        logger: logging.Logger | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_listing_bytes: int = DEFAULT_MAX_LISTING_BYTES,
    ) -> None:
        parsed = URL(gateway_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"gateway URL must be an absolute http(s) URL, got {gateway_url!r}")
        if not math.isfinite(listing_timeout) or listing_timeout <= 0:
            raise ValueError(f"listing_timeout must be a positive number of seconds, got {listing_timeout!r}")
        self._base = gateway_url.rstrip("/")
        self._headers = {"Authorization": _basic_auth(*credentials)} if credentials is not None else {}
        self._delimiter = topic_delimiter
        self._timeout = aiohttp.ClientTimeout(total=listing_timeout)
        self._namespaces = list(namespaces) if namespaces is not None else None
        self._max_bytes = max_listing_bytes
        self._session = session
        self._owns_session = session is None
        # True: aiohttp's default verification against the system's roots.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._log = logger or logging.getLogger(__name__)
        # Bad annotations are reported once each, not on every rebuild interval.
        self._reported: set[tuple[str, str, str]] = set()

    @property
    def gateway_url(self) -> str:
        """The base URL, without a trailing slash."""
        return self._base

    async def close(self) -> None:
        """Close the HTTP session if this registry created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> GatewayRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def fetch(self) -> list[FunctionTarget]:
        """List every namespace's functions; return the subscribed ones, sorted by name.

        Raises :class:`RegistryError` on a non-2xx status, a connection error or timeout, or a
        body that is not the JSON the gateway API documents.
        """
        targets: list[FunctionTarget] = []
        for namespace in await self._list_namespaces():
            for index, status in enumerate(await self._list_functions(namespace), 1):
                target = self._target(status, namespace)
                if target is not None:
                    targets.append(target)
                if index % _ENTRIES_PER_YIELD == 0:
                    await asyncio.sleep(0)  # a listing of 100k functions must not stall the loop
        # Sorted so that an unchanged deployment always yields an equal list (no spurious re-applies).
        return sorted(targets, key=lambda target: target.name)

    async def _list_namespaces(self) -> list[str]:
        """Namespaces to list; ``[""]`` means "the gateway's default, without ``?namespace``"."""
        if self._namespaces is not None:
            return list(self._namespaces)
        url = self._url("/system/namespaces")
        body = await self._get(url, not_found_ok=True)
        # 404: a provider without namespace support. Empty, null and [] all mean "no namespaces".
        if body is None or not body.strip():
            return [""]
        names = await self._decode(url, body)
        if names is None:
            return [""]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise RegistryError(f"GET {_shown(url)}: expected a JSON list of namespace names", _shown(url))
        return list(dict.fromkeys(names)) or [""]

    async def _list_functions(self, namespace: str) -> list[Mapping[str, Any]]:
        url = self._url("/system/functions", namespace=namespace)
        body = await self._get(url)
        # Unlike namespaces, an empty body is an error: reading it as "no functions" would
        # silently unsubscribe everything when a proxy misbehaves.
        expected = f"GET {_shown(url)}: expected a JSON list of functions with names"
        try:
            statuses = await self._decode(url, body or b"", _subscriber)
        except _NotAFunction:
            raise RegistryError(expected, _shown(url)) from None
        if statuses is None:
            return []
        if not isinstance(statuses, list):
            raise RegistryError(expected, _shown(url))
        return [status for status in statuses if status is not None]

    def _url(self, path: str, *, namespace: str = "") -> URL:
        url = URL(self._base + path)
        # The namespace parameter is omitted for "", as connector-sdk does.
        return url.with_query(namespace=namespace) if namespace else url

    async def _get(self, url: URL, *, not_found_ok: bool = False) -> bytes | bytearray | None:
        """GET ``url``; the body of a 2xx answer, or None for a tolerated 404."""
        session = self._ensure_session()
        try:
            async with session.get(
                url, headers=self._headers, timeout=self._timeout, ssl=self._ssl
            ) as response:
                status, reason = response.status, response.reason
                body = await self._read_capped(url, response)
        except TimeoutError as exc:
            message = f"GET {_shown(url)}: no response within {self._timeout.total}s"
            raise RegistryError(message, _shown(url)) from exc
        except aiohttp.ClientError as exc:
            message = f"GET {_shown(url)}: {type(exc).__name__}: {exc}"
            raise RegistryError(message, _shown(url)) from exc
        if status == 404 and not_found_ok:
            return None
        if not 200 <= status < 300:
            snippet = body[:_ERROR_BODY_CHARS].decode("utf-8", "replace").strip()
            message = f"GET {_shown(url)}: HTTP {status} {reason or ''}".rstrip()
            if snippet:
                message += f": {snippet}"
            raise RegistryError(message, _shown(url), status)
        return body

    async def _read_capped(self, url: URL, response: aiohttp.ClientResponse) -> bytes | bytearray:
        """The body, refused once it passes ``max_listing_bytes`` (before it is all in memory)."""
        cap = self._max_bytes
        size = response.content_length
        if size is None or size <= cap:
            # Appended as it arrives: one join of a 30 MB listing would hold the loop for ~30 ms.
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 20):
                if len(body) + len(chunk) > cap:
                    break
                body += chunk
            else:
                return bytes(body) if len(body) <= _OFF_LOOP_BYTES else body
        declared = response.content_length
        what = f"{declared} bytes" if declared is not None and declared > cap else f"more than {cap} bytes"
        message = (
            f"GET {_shown(url)}: the listing ({what}) exceeds [gateway] max_listing_bytes ({cap}); "
            "raise max_listing_bytes if the gateway really lists that much"
        )
        raise RegistryError(message, _shown(url), response.status)

    @staticmethod
    async def _decode(url: URL, body: bytes | bytearray, each: Callable[[Any], Any] | None = None) -> Any:
        """The JSON document; when large, decoded in a worker thread element by element (each
        element passed through ``each``)."""
        try:
            if len(body) > _OFF_LOOP_BYTES:
                return await asyncio.to_thread(lambda: decode_json_list(utf8_text(body), each))
            value = json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise RegistryError(f"GET {_shown(url)}: invalid JSON: {exc}", _shown(url)) from exc
        return [each(item) for item in value] if each is not None and isinstance(value, list) else value

    def _ensure_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _target(self, status: Mapping[str, Any], namespace: str) -> FunctionTarget | None:
        """The target for one ``FunctionStatus``, or None if the function subscribes to nothing."""
        annotations = status.get("annotations")
        # The gateway omits or nulls annotations for functions deployed without any.
        if not isinstance(annotations, dict):
            return None
        topic = annotations.get(TOPIC_ANNOTATION)
        topics = parse_topics(topic, self._delimiter) if isinstance(topic, str) else ()
        if not topics:
            return None
        label = _label(status["name"], namespace)
        url, async_url = _invoke_urls(self._base, label)
        return FunctionTarget(
            name=label,
            topics=topics,
            url=url,
            async_url=async_url,
            max_inflight=self._max_inflight(label, annotations.get(MAX_INFLIGHT_ANNOTATION)),
            timeout=self._timeout_annotation(label, annotations.get(TIMEOUT_ANNOTATION)),
            asynchronous=str(annotations.get(ASYNC_ANNOTATION, "")).strip().lower() == "true",
            schedule=_text(annotations.get(SCHEDULE_ANNOTATION)),
            timezone=_text(annotations.get(TIMEZONE_ANNOTATION)),
            cron_policy=tuple(
                sorted(
                    (key.removeprefix(CRON_POLICY_PREFIX), str(value))
                    for key, value in annotations.items()
                    if key.startswith(CRON_POLICY_PREFIX)
                )
            ),
        )

    def _max_inflight(self, label: str, value: object) -> int | None:
        if value is None:
            return None
        try:
            limit = int(str(value).strip())
        except ValueError:
            limit = 0
        if not 1 <= limit <= _core.MAX_INFLIGHT:
            # Checked here, not only in the core: one bad annotation must cost only that
            # annotation, never the whole table.
            self._report(
                label, MAX_INFLIGHT_ANNOTATION, value, f"expected an integer from 1 to {_core.MAX_INFLIGHT}"
            )
            return None
        return limit

    def _timeout_annotation(self, label: str, value: object) -> float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self._report(label, TIMEOUT_ANNOTATION, value, str(exc))
            return None
        if seconds <= 0:
            # Zero would mean "fail at once" here but "no timeout" in Go; neither is meant.
            self._report(label, TIMEOUT_ANNOTATION, value, "expected a positive duration")
            return None
        return seconds

    def _report(self, label: str, key: str, value: object, reason: str) -> None:
        """Warn once per (function, annotation, value) that a bad annotation falls back to defaults."""
        seen = (label, key, str(value))
        if seen in self._reported:
            return
        self._reported.add(seen)
        self._log.warning(
            "function %s: ignoring annotation %s=%r (%s); using the default", label, key, value, reason
        )


def _text(value: object) -> str | None:
    """A string annotation, trimmed; None when absent, blank or not a string."""
    return (value.strip() or None) if isinstance(value, str) else None


def _basic_auth(user: str, password: str) -> str:
    """An ``Authorization`` value, built by hand: aiohttp 3.14 deprecates ``BasicAuth`` and its
    replacement (``encode_basic_auth``) does not exist in the older releases we support."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


_READ_ANNOTATIONS: Final = (
    TOPIC_ANNOTATION,
    ASYNC_ANNOTATION,
    MAX_INFLIGHT_ANNOTATION,
    TIMEOUT_ANNOTATION,
    SCHEDULE_ANNOTATION,
    TIMEZONE_ANNOTATION,
)


class _NotAFunction(Exception):
    """A listing entry that is not a ``FunctionStatus`` with a name."""


def _subscriber(status: Any) -> dict[str, Any] | None:
    """A ``FunctionStatus`` reduced to what :meth:`GatewayRegistry._target` reads, or None when
    the function subscribes to nothing. Applied as each entry is decoded, so a listing of many
    functions does not stay in memory whole (which would also lengthen the garbage collector's
    full passes, stalling the event loop)."""
    if not (isinstance(status, dict) and isinstance(status.get("name"), str) and status["name"]):
        raise _NotAFunction
    annotations = status.get("annotations")
    # The gateway omits or nulls annotations for functions deployed without any.
    if not isinstance(annotations, dict) or TOPIC_ANNOTATION not in annotations:
        return None
    read = {
        key: value
        for key, value in annotations.items()
        if key in _READ_ANNOTATIONS or key.startswith(CRON_POLICY_PREFIX)
    }
    return {"name": status["name"], "annotations": read}


def _shown(url: URL) -> str:
    """``url`` as safe to log: without any user:password it may carry."""
    return str(url.with_user(None))


# ---------------------------------------------------------------------------- periodic rebuild


class TopicMapSync:
    """Keeps the function table current: static targets plus a periodic gateway listing.

    ``apply`` receives the merged list (static first, then gateway targets sorted by name) on
    the first success and whenever it changes. A failed listing never stops the loop: the last
    good table stays in force, one warning is logged, the counters below are updated, and the
    listing is retried after ``min(rebuild_interval, backoff)`` with backoff doubling from 0.5 s.
    ``on_failure`` (e.g. a metric) is called with each failure's exception.
    """

    failures: int
    """Failed rebuilds since construction."""
    consecutive_failures: int
    """Failed rebuilds since the last success (0 when healthy)."""
    last_error: str | None
    """The most recent failure's message; kept after a later success."""
    last_success: float | None
    """``time.monotonic()`` of the last successful rebuild."""

    def __init__(
        self,
        gateway: GatewayRegistry | None,
        static: Sequence[FunctionTarget],
        rebuild_interval: float,
        apply: Callable[[list[FunctionTarget]], None],
        logger: logging.Logger | None = None,
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        # connector-sdk panics on a zero interval (time.NewTicker); refuse it up front instead.
        if not math.isfinite(rebuild_interval) or rebuild_interval <= 0:
            raise ValueError(
                f"rebuild_interval must be a positive number of seconds, got {rebuild_interval!r}"
            )
        self._gateway = gateway
        self._static = list(static)
        self._interval = rebuild_interval
        self._apply = apply
        self._log = logger or logging.getLogger(__name__)
        self._on_failure = on_failure
        self._targets: list[FunctionTarget] = []
        self._task: asyncio.Task[None] | None = None
        self._shadowed: set[str] = set()
        self.ready = asyncio.Event()
        """Set after the first successful build; stays set through later failures."""
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success = None

    @property
    def targets(self) -> list[FunctionTarget]:
        """The table currently in force (a copy)."""
        return list(self._targets)

    def topic_map(self) -> dict[str, list[str]]:
        """Topic → sorted function names, topics in sorted order (for the ``topics`` command)."""
        subscribers: dict[str, list[str]] = {}
        for target in self._targets:
            for topic in target.topics:
                subscribers.setdefault(topic, []).append(target.name)
        return {topic: sorted(names) for topic, names in sorted(subscribers.items())}

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Build the table: at once without a gateway, else in a background loop (run by
        ``supervisor`` when given: restarted, counted and reported should it ever die)."""
        if self._task is not None:
            raise RuntimeError("TopicMapSync already started")
        if self._gateway is None:
            await self.refresh()
            return
        if supervisor is not None:
            self._task = supervisor.spawn("topic-map", self._run)
        else:
            self._task = asyncio.create_task(self._run(), name="fastconn-topic-map-sync")

    async def stop(self) -> None:
        """Stop the rebuild loop (the table in force stays readable)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # asyncio.wait, not `await task`: it does not raise the task's CancelledError, so a
        # cancellation of stop() itself still propagates.
        await asyncio.wait({task})

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first successful build; True if it happened."""
        if self.ready.is_set():  # the common case, asked per message batch: no timer
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            return False
        return True

    async def refresh(self) -> bool:
        """One rebuild attempt; True on success. Never raises (except on cancellation)."""
        try:
            listed = await self._gateway.fetch() if self._gateway is not None else []
            self._publish(self._merge(listed))
        except Exception as exc:
            # Broad on purpose: a bug in listing or in `apply` must not kill the loop or the daemon.
            self._record_failure(exc)
            return False
        self._record_success()
        return True

    async def _run(self) -> None:
        while True:
            ok = await self.refresh()
            await asyncio.sleep(self._interval if ok else self._retry_delay())

    def _retry_delay(self) -> float:
        return doubling(self.consecutive_failures, _INITIAL_BACKOFF, self._interval)

    def _merge(self, listed: list[FunctionTarget]) -> list[FunctionTarget]:
        """Static targets first; a gateway function with a static target's name is shadowed."""
        static_names = {target.name for target in self._static}
        for target in listed:
            if target.name in static_names and target.name not in self._shadowed:
                self._shadowed.add(target.name)
                self._log.warning("gateway function %s is shadowed by a static function entry", target.name)
        return self._static + [target for target in listed if target.name not in static_names]

    def _publish(self, merged: list[FunctionTarget]) -> None:
        if self.ready.is_set() and merged == self._targets:
            return
        # apply first: if it raises, the old table stays recorded and the next attempt re-applies.
        self._apply(merged)
        self._targets = merged
        topics = {topic for target in merged for topic in target.topics}
        self._log.info("function table updated: %d function(s), %d topic(s)", len(merged), len(topics))

    def _record_success(self) -> None:
        if self.consecutive_failures:
            self._log.info("function listing recovered after %d failed attempts", self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_success = time.monotonic()
        self.ready.set()

    def _record_failure(self, exc: Exception) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = str(exc) or type(exc).__name__
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:  # a broken hook must not stop the rebuild loop either
                self._log.exception("on_failure hook failed")
        kept = (
            f"keeping the last table of {len(self._targets)} function(s)"
            if self.ready.is_set()
            else "no table yet"
        )
        self._log.warning(
            "function listing failed (%d in a row; %s; retrying in %.3gs): %s",
            self.consecutive_failures,
            kept,
            self._retry_delay(),
            self.last_error,
            # Expected failures are one line; anything else is a bug worth a traceback.
            exc_info=not isinstance(exc, RegistryError),
        )
