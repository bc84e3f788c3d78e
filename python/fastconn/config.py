"""fastconn configuration: a TOML file validated with pydantic, plus OpenFaaS environment overrides.

The TOML keys are a public interface (documented in the README), so every model forbids unknown keys:
a misspelt option is an error, not silently ignored. The file comes from ``--config PATH`` or
``FASTCONN_CONFIG``; the environment variables the OpenFaaS connector-sdk reads (``gateway_url``,
``topics``, ``upstream_timeout``, ...) override it, so fastconn drops into existing connector
deployments unchanged.

Validation reports *all* problems at once as a :class:`~fastconn.errors.ConfigError`, each with a
location in the user's own spelling (``functions[0].topics``, ``env:upstream_timeout``), what was
expected, and the offending value.

``[[sources]]`` are pluggable: ``type = "x"`` selects module ``fastconn.sources.x`` (hyphens become
underscores), whose ``CONFIG_MODEL`` validates the table. Adding a source therefore touches no file
but its own.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import os
import pkgutil
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from fastconn import _core
from fastconn.durations import Duration, parse_duration
from fastconn.errors import MISSING, ConfigError, ConfigProblem

__all__ = [
    "Config",
    "DispatchConfig",
    "FunctionConfig",
    "GatewayConfig",
    "ServerConfig",
    "known_source_types",
    "load_config",
    "source_config_model",
    "validate_config",
]

_SOURCES_PACKAGE: Final = "fastconn.sources"


# --------------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------------


_CONTROL: Final = re.compile(r"[\x00-\x20\x7f]")


def _check_http_url(value: str) -> str:
    # urlsplit silently drops CR, LF and tab (WHATWG rules), so "http://h/\r\nX: y" would
    # pass here and be refused (or worse, sent) later: control characters and spaces are errors.
    if _CONTROL.search(value):
        raise ValueError("must not contain spaces or control characters (CR, LF, tab, ...)")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    # The dispatcher's own parser has the last word, so `check` accepts exactly what `run` can call.
    problem = _core.validate_url(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_base_url(value: str) -> str:
    # Base URLs get paths appended ("/function/<name>", "/system/functions"), so a trailing slash
    # would produce "//function/..."; normalise it away once here.
    return _check_http_url(value).rstrip("/")


def _check_optional_base_url(value: str) -> str:
    return _check_base_url(value) if value else value


_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


def _check_function_name(value: str) -> str:
    if not _FUNCTION_NAME.fullmatch(value):
        raise ValueError("expected a non-empty name of letters, digits, '_', '.' and '-'")
    return value


_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


def _split_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[ipv6]:port`` into host (without brackets) and port."""
    expected = "expected host:port, e.g. '127.0.0.1:8081', '0.0.0.0:8081' or '[::1]:8081'"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(expected)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}; {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(expected)
        if ":" in host:
            raise ValueError(f"{expected}; IPv6 addresses must be in brackets")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{expected}; {host!r} is not a valid host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{expected}; port must be 0..65535")
    return host, int(port_text)


def _check_listen(value: str) -> str:
    _split_listen(value)
    return value


def _check_admin_listen(value: str | None) -> str | None:
    """``host:port``, or just a port (``"9090"`` / ``":9090"``): then loopback, so metrics are not
    exposed by accident."""
    if value is None:
        return None
    if value.lstrip(":").isdigit():
        value = "127.0.0.1:" + value.lstrip(":")
    _split_listen(value)
    return value


_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

_HEADER_VALUE_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_header_value(value: str) -> str:
    # A CR or LF in a header value would end the header (or inject another); the core refuses
    # such a value on every request, so refuse it once, here.
    if _HEADER_VALUE_FORBIDDEN.search(value):
        raise ValueError("a header value must not contain CR, LF or other control characters")
    return value


_NonEmptyStr = Annotated[str, Field(min_length=1)]
_HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
_BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
_PositiveInt = Annotated[int, Field(ge=1)]
# In-flight bounds become semaphores in the core, which refuses more permits than this.
_InflightBound = Annotated[int, Field(ge=1, le=_core.MAX_INFLIGHT)]
# Timeouts and intervals of zero make no sense (an instant timeout, a busy loop); waits may be zero.
_PositiveDuration = Annotated[Duration, Field(gt=0)]
_StatusCode = Annotated[int, Field(ge=100, le=599)]


class _Model(BaseModel):
    # Unknown keys are errors (typos must not pass silently); frozen so a validated config cannot
    # drift while the daemon runs.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class GatewayConfig(_Model):
    """``[gateway]``: the OpenFaaS gateway whose functions are discovered and invoked."""

    url: _BaseUrl = "http://127.0.0.1:8080"
    """Gateway base URL (env ``gateway_url``); stored without a trailing slash."""
    upstream_timeout: _PositiveDuration = 30.0
    """Default per-invocation timeout, seconds (env ``upstream_timeout``)."""
    rebuild_interval: _PositiveDuration = 10.0
    """How often the topic map is rebuilt from the gateway, seconds (env ``rebuild_interval``)."""
    basic_auth: bool = False
    """Send gateway basic-auth credentials read from ``secret_mount_path`` (env ``basic_auth``)."""
    secret_mount_path: _NonEmptyStr = "/var/openfaas/secrets"
    """Directory holding ``basic-auth-user`` / ``basic-auth-password`` (env ``secret_mount_path``)."""
    topic_delimiter: _NonEmptyStr = ","
    """Separator inside a function's ``topic`` annotation (env ``topic_delimiter``)."""
    namespaces: tuple[_NonEmptyStr, ...] = ()
    """Namespaces to list; empty means discover them via ``/system/namespaces``."""
    listing_timeout: _PositiveDuration = 5.0
    """Timeout for one gateway listing request, seconds."""
    startup_wait: Duration = 30.0
    """How long messages wait for the first successful topic map before being dropped, seconds."""
    max_listing_bytes: Annotated[int, Field(ge=1024, le=1 << 31)] = 32 * 1024 * 1024
    """Largest ``/system/functions`` answer read; a larger one fails the listing (last table kept)."""
    tls_ca: _NonEmptyStr | None = None
    """PEM file of CA certificates trusted for https:// calls, on top of the system's roots."""
    tls_cert: _NonEmptyStr | None = None
    """Client certificate chain (PEM) for servers that require one (mutual TLS); needs tls_key."""
    tls_key: _NonEmptyStr | None = None
    """Private key (PEM) of ``tls_cert``."""
    tls_insecure_skip_verify: bool = False
    """Accept any server certificate: for tests only, anyone on the path can pose as the server."""

    @model_validator(mode="after")
    def _tls_material_loads(self) -> GatewayConfig:
        # The Rust core reads the files exactly as the dispatcher will at start-up, so a file
        # `check` accepts is one `run` accepts, and the error names the key at fault.
        problem = _core.check_tls(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)
        if problem is not None:
            setting, message = problem
            details = [_error(message, (setting,), getattr(self, setting, None))]
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS settings for Python's own HTTPS requests (the gateway listing), or None
        when they are all defaults (the system's roots, no client certificate)."""
        if not (self.tls_ca or self.tls_cert or self.tls_insecure_skip_verify):
            return None
        context = ssl.create_default_context()
        if self.tls_ca:
            context.load_verify_locations(cafile=self.tls_ca)  # added to the system's roots
        if self.tls_cert and self.tls_key:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def credentials(self) -> tuple[str, str] | None:
        """Return ``(user, password)`` when ``basic_auth`` is on, else ``None``.

        Read on demand (not at validation) because OpenFaaS mounts secrets as files that may be
        rotated; :func:`fastconn.preflight.preflight` reads them once for ``check`` and ``run``. Raises
        :class:`ConfigError` at ``gateway.secret_mount_path`` when a file is missing or empty.
        """
        if not self.basic_auth:
            return None
        base = Path(self.secret_mount_path)
        values: list[str] = []
        problems: list[ConfigProblem] = []
        for filename in ("basic-auth-user", "basic-auth-password"):
            path = base / filename
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                message = f"basic_auth is enabled but {str(path)!r} cannot be read ({reason})"
                problems.append(ConfigProblem("gateway.secret_mount_path", message, self.secret_mount_path))
                continue
            if not text:
                message = f"basic_auth is enabled but {str(path)!r} is empty"
                problems.append(ConfigProblem("gateway.secret_mount_path", message, self.secret_mount_path))
            values.append(text)
        if problems:
            raise ConfigError(problems)
        return values[0], values[1]


class DispatchConfig(_Model):
    """``[dispatch]``: how messages are delivered to functions."""

    content_type: Annotated[_NonEmptyStr, AfterValidator(_check_header_value)] = "text/plain"
    """``Content-Type`` of invocation requests (env ``content_type``)."""
    max_inflight: _InflightBound = 1024
    """Bound on concurrent invocations across all functions."""
    max_inflight_per_function: _InflightBound = 256
    """Default bound on concurrent invocations of one function."""
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    """Attempts per invocation including the first; 1 disables retries."""
    retry_on: tuple[_StatusCode, ...] = (408, 429, 500, 502, 503, 504)
    """HTTP statuses that are retried (connection errors always are)."""
    backoff_initial: Duration = 0.1
    """First retry delay, seconds; doubles per attempt up to ``backoff_max``."""
    backoff_max: Duration = 30.0
    asynchronous_invocation: bool = False
    """Invoke via the gateway's ``/async-function/`` route (env ``asynchronous_invocation``)."""
    print_response: bool = False
    print_response_body: bool = False
    print_request_body: bool = False
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    """Worker threads of the native (tokio) runtime."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 512
    """Most messages moved across the Python/Rust bridge in one crossing."""
    shutdown_timeout: Duration = 30.0
    """How long shutdown waits for in-flight invocations, seconds."""
    async_ack: Literal["on_callback", "on_accept"] = "on_callback"
    """When an async invocation settles its source message: when the callback reports the
    function's result (at-least-once), or on the gateway's 202 (as OpenFaaS connectors do)."""
    callback_timeout: _PositiveDuration = 600.0
    """No callback within this long counts as a retryable failure."""
    max_pending_callbacks: _PositiveInt = 10000
    """Async calls waiting for their callback; when full, new async invocations wait."""
    max_callback_bytes: Annotated[int, Field(ge=1, le=1 << 31)] = 16 * 1024 * 1024
    """Largest callback body (an async call's result); a larger one fails its call at once."""
    callback_secret: str | None = None
    """Key of the callback URL tokens (HMAC); generated at start-up when unset. Set it when
    callbacks must survive a restart (calls in flight across the restart)."""

    @field_validator("backoff_max")
    @classmethod
    def _backoff_ordered(cls, value: float, info: ValidationInfo) -> float:
        # A field validator (not a model validator) so the error points at dispatch.backoff_max.
        # backoff_initial is declared first, so it is in info.data unless it was itself invalid.
        initial = info.data.get("backoff_initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be >= backoff_initial ({initial:g}s)")
        return value


class ServerConfig(_Model):
    """``[server]``: the built-in HTTP server (health, metrics, webhook sources)."""

    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:8081"
    """``host:port`` or ``[ipv6]:port``; port 0 picks a free port."""
    public_url: Annotated[str, AfterValidator(_check_optional_base_url)] = ""
    """URL under which the server is reachable from outside; empty derives it from ``listen``."""
    header_timeout: _PositiveDuration = 10.0
    """Seconds a new connection has to send its first request head before it is closed."""
    idle_timeout: _PositiveDuration = 75.0
    """Seconds an idle keep-alive connection stays open."""
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    """Open connections; at the cap the oldest one still sending its first head is closed."""
    admin_listen: Annotated[str | None, AfterValidator(_check_admin_listen)] = None
    """A separate listener for ``/metrics`` (a port alone means loopback): operators can then
    expose ``listen`` (events, callbacks, probes) without exposing metrics. Unset, ``/metrics``
    answers on ``listen``."""
    readiness_grace: Duration = 10.0
    """How long a source's broker may be unreachable before ``/readyz`` turns 503: a broker
    restart or a leader change should not take every replica out of the load balancer."""
    tls_cert: _NonEmptyStr | None = None
    """Certificate chain (PEM, server certificate first) served on ``listen``: with ``tls_key``
    the listener speaks HTTPS only, and a derived ``public_url`` says https."""
    tls_key: _NonEmptyStr | None = None
    """Private key (PEM) of ``tls_cert``."""
    http2: bool = False
    """Also speak HTTP/2 on ``listen``: h2 over TLS (ALPN) or prior-knowledge h2c in clear;
    HTTP/1.1 keeps working on the same port."""
    http2_max_concurrent_streams: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Requests one HTTP/2 connection may have open at once (each keeps its own body limit)."""

    @model_validator(mode="after")
    def _tls_material_loads(self) -> ServerConfig:
        # The core reads the files exactly as the listener will at start-up, so a pair `check`
        # accepts is one `run` serves with, and the error names the key at fault.
        if self.tls_cert is None and self.tls_key is None:
            return self
        problem = _core.check_server_tls(cert=self.tls_cert, key=self.tls_key)
        if problem is not None:
            setting, message = problem
            details = [_error(message, (setting,), getattr(self, setting, None))]
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    @property
    def tls(self) -> bool:
        """Whether ``listen`` serves HTTPS."""
        return self.tls_cert is not None

    @property
    def host(self) -> str:
        """Listen host, without IPv6 brackets."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """Listen port."""
        return _split_listen(self.listen)[1]


class FunctionConfig(_Model):
    """A ``[[functions]]`` entry: a statically configured function and its topics."""

    name: Annotated[str, AfterValidator(_check_function_name)]
    url: _HttpUrl | None = None
    """Invoke URL; when absent the gateway's ``/function/<name>`` is used."""
    topics: Annotated[tuple[_NonEmptyStr, ...], Field(min_length=1)]
    """Topics the function subscribes to; with a ``schedule``, ``cron-function`` is added
    (and is the default)."""
    namespace: _NonEmptyStr | None = None
    max_inflight: _InflightBound | None = None
    """Overrides ``dispatch.max_inflight_per_function`` for this function."""
    timeout: _PositiveDuration | None = None
    """Overrides ``gateway.upstream_timeout`` for this function, seconds."""
    asynchronous: bool = False
    """Invoke via the gateway's ``/async-function/`` route."""
    schedule: _NonEmptyStr | None = None
    """A cron schedule fired by a ``type = "cron"`` source (the function then also subscribes
    to ``cron-function``)."""
    timezone: _NonEmptyStr | None = None
    """IANA zone of ``schedule``; the cron source's ``timezone`` when absent."""

    @model_validator(mode="before")
    @classmethod
    def _scheduled_default_topic(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "schedule" in data and "topics" not in data:
            return {**data, "topics": ["cron-function"]}
        return data

    @model_validator(mode="after")
    def _check_schedule(self) -> FunctionConfig:
        if self.timezone is not None and self.schedule is None:
            raise ValueError("timezone applies to a schedule; add schedule or remove timezone")
        if self.schedule is not None:
            # Imported here: croniter is only loaded by configurations that schedule something.
            from fastconn.sources.cron.schedule import parse_schedule

            parse_schedule(self.schedule, self.timezone or "UTC")  # ScheduleError is a ValueError
        return self

    @field_validator("asynchronous")
    @classmethod
    def _async_needs_gateway_route(cls, value: bool, info: ValidationInfo) -> bool:
        # Asynchronous invocation is a gateway feature (queue-worker); a static URL has no such route.
        if value and info.data.get("url") is not None:
            raise ValueError("asynchronous invocation goes through the gateway; remove url or set false")
        return value

    @property
    def label(self) -> str:
        """Name used in metrics, logs and ``X-Function-Name``: ``name`` or ``name.namespace``."""
        return f"{self.name}.{self.namespace}" if self.namespace else self.name

    def invoke_urls(self, gateway: GatewayConfig | None) -> tuple[str, str | None]:
        """Return ``(sync_url, async_url)``; ``async_url`` is None for a static ``url``.

        Raises :class:`ConfigError` when there is neither a ``url`` nor a gateway (which
        :class:`Config` validation already rules out).
        """
        if self.url is not None:
            return self.url, None
        if gateway is None:
            raise ConfigError.single(
                "gateway", f"function {self.name!r} has no url and there is no [gateway]"
            )
        return f"{gateway.url}/function/{self.label}", f"{gateway.url}/async-function/{self.label}"


# --------------------------------------------------------------------------------------------------
# Pluggable sources
# --------------------------------------------------------------------------------------------------

_SOURCE_TYPE: Final = re.compile(r"[a-z][a-z0-9_-]*")


def known_source_types() -> list[str]:
    """Names of the modules in ``fastconn.sources`` (i.e. the valid ``[[sources]] type`` values).

    Found with :mod:`pkgutil` without importing them, so a source whose optional dependency is not
    installed is still listed (and reported precisely only when used).
    """
    package = importlib.import_module(_SOURCES_PACKAGE)
    return sorted(
        info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")
    )


def source_config_model(type_name: str) -> type[BaseModel]:
    """Return ``CONFIG_MODEL`` of the source module for ``type_name``.

    Raises :class:`LookupError` (with a user-facing message) for an unknown type, a module without
    ``CONFIG_MODEL`` (a helper, not a source) or a source whose dependencies are missing, and
    :class:`TypeError` when ``CONFIG_MODEL`` is not a pydantic model class (a bug in that module,
    not in the user's config).
    """
    known = ", ".join(known_source_types()) or "none installed"
    if not _SOURCE_TYPE.fullmatch(type_name):
        raise LookupError(f"unknown source type (known: {known})")
    module_name = f"{_SOURCES_PACKAGE}.{type_name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise LookupError(f"unknown source type (known: {known})") from None
        # The module exists but needs something that is not installed (e.g. aiokafka).
        raise LookupError(f"source type {type_name!r} is unavailable: {exc}") from None
    model = getattr(module, "CONFIG_MODEL", None)
    if model is None:
        # A helper module living in the package (e.g. shared base classes), not a source.
        raise LookupError(f"unknown source type (known: {known})")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{module_name}.CONFIG_MODEL must be a pydantic model class, got {model!r}")
    return model


# --------------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------------


class Config(_Model):
    """The whole configuration file."""

    topics: tuple[_NonEmptyStr, ...] = ()
    """Default subscription topics for sources that take a topic list (env ``topics``)."""
    gateway: GatewayConfig | None = None
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    functions: tuple[FunctionConfig, ...] = ()
    sources: tuple[Any, ...] = ()
    """Validated source configs, each an instance of its source module's ``CONFIG_MODEL``."""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"

    @property
    def public_url_derived(self) -> bool:
        """Whether ``public_url`` is a guess from ``listen`` (reachable from this host only when
        ``listen`` is a loopback address)."""
        return not self.server.public_url

    @property
    def public_url(self) -> str:
        """``server.public_url``, else ``http(s)://<listen>`` with wildcard hosts made connectable
        (https when the listener has a certificate)."""
        if self.server.public_url:
            return self.server.public_url
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.server.host, self.server.host)
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.server.tls else "http"
        return f"{scheme}://{host}:{self.server.port}"

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.lower()
        level = "warning" if level == "warn" else level
        if level not in _LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
        return level

    @field_validator("sources")
    @classmethod
    def _validate_sources(cls, entries: tuple[Any, ...]) -> tuple[BaseModel, ...]:
        # Two steps: the string ``type`` picks the model, the model validates the rest. Errors are
        # re-raised as one ValidationError whose locations pydantic prefixes with "sources".
        details: list[InitErrorDetails] = []
        validated: list[BaseModel] = []
        for index, item in enumerate(entries):
            # A model instance comes from programmatic construction or revalidation.
            entry = item.model_dump() if isinstance(item, BaseModel) else item
            if not isinstance(entry, Mapping):
                details.append(_error('expected a table like [[sources]] type = "webhook"', (index,), entry))
                continue
            type_name = entry.get("type", MISSING)
            if type_name is MISSING:
                details.append(_error("required key is missing", (index, "type"), MISSING, "missing"))
                continue
            if not isinstance(type_name, str):
                known = ", ".join(known_source_types())
                details.append(
                    _error(f"expected a source type name (known: {known})", (index, "type"), type_name)
                )
                continue
            try:
                model = source_config_model(type_name)
            except LookupError as exc:
                details.append(_error(str(exc), (index, "type"), type_name))
                continue
            try:
                validated.append(model.model_validate(entry))
            except ValidationError as exc:
                details.extend(_rewrap(err, (index, *err["loc"])) for err in exc.errors())
        if details:
            raise ValidationError.from_exception_data(cls.__name__, details)
        return tuple(validated)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        # A wrap validator rather than an "after" one so the cross-field rules are checked (on the
        # raw input) even when some field is invalid: the user gets every problem in one run. It is
        # also the one place where pydantic's messages are made friendlier.
        details: list[InitErrorDetails] = []
        config: Config | None = None
        try:
            config = handler(data)
        except ValidationError as exc:
            details.extend(_friendly(err, data) for err in exc.errors())
        if isinstance(data, Mapping):
            details.extend(_cross_field_errors(data))
        if details or config is None:
            raise ValidationError.from_exception_data(cls.__name__, details)
        return config


def _cross_field_errors(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    has_gateway = data.get("gateway") is not None
    functions = data.get("functions", ())
    if not isinstance(functions, Sequence) or isinstance(functions, str):
        functions = ()  # the type error itself is reported by field validation
    errors: list[InitErrorDetails] = []
    if not has_gateway and not functions:
        errors.append(
            _error("nothing to invoke: configure [gateway] or [[functions]]", ("gateway",), MISSING)
        )
    first_seen: dict[str, int] = {}
    for index, function in enumerate(functions):
        if not isinstance(function, Mapping):
            continue
        if function.get("url") is None and not has_gateway:
            loc = ("functions", index, "url")
            errors.append(_error("no url and no [gateway] to derive one from", loc, MISSING))
        name, namespace = function.get("name"), function.get("namespace")
        if isinstance(name, str) and name:
            # The same name in two namespaces is two different functions in OpenFaaS.
            label = f"{name}.{namespace}" if isinstance(namespace, str) and namespace else name
            if label in first_seen:
                message = f"duplicate function name (also functions[{first_seen[label]}])"
                errors.append(_error(message, ("functions", index, "name"), name))
            else:
                first_seen[label] = index
    errors.extend(_callback_address_errors(data, functions))
    errors.extend(_source_clash_errors(data.get("sources")))
    return errors


def _source_clash_errors(sources: Any) -> list[InitErrorDetails]:
    """Two sources with one name share metrics and log lines; two webhook sources would share
    the one route ``POST /webhook/{topic}`` (only the first would ever get a request), two sns
    sources one path."""
    if not isinstance(sources, Sequence) or isinstance(sources, str):
        return []
    errors: list[InitErrorDetails] = []
    names: dict[str, int] = {}
    sns_paths: dict[str, int] = {}
    first_webhook: int | None = None
    for index, source in enumerate(sources):
        if not isinstance(source, Mapping) or not isinstance(source.get("type"), str):
            continue
        type_name = source["type"]
        if type_name == "webhook":
            if first_webhook is None:
                first_webhook = index
            else:
                message = (
                    f"a second webhook source (also sources[{first_webhook}]): both would serve "
                    "POST /webhook/{topic}; use one webhook source"
                )
                errors.append(_error(message, ("sources", index, "type"), type_name))
        if type_name == "sns":
            path = source.get("path", "/sns")
            if not isinstance(path, str):
                pass  # the model reports the type
            elif path in sns_paths:
                message = (
                    f"another sns source (sources[{sns_paths[path]}]) serves this path: give each its own"
                )
                errors.append(_error(message, ("sources", index, "path"), path))
            else:
                sns_paths[path] = index
        # Each source type defaults its name to the type.
        name = source.get("name", type_name)
        if not isinstance(name, str):
            continue
        if name in names:
            message = (
                f"duplicate source name (also sources[{names[name]}]): metrics and logs would mix "
                "them; give each source its own name"
            )
            errors.append(_error(message, ("sources", index, "name"), name))
        else:
            names[name] = index
    return errors


_UNSPECIFIED_HOSTS: Final = frozenset({"0.0.0.0", "::", "[::]", ""})


def _callback_address_errors(data: Mapping[str, Any], functions: Sequence[Any]) -> list[InitErrorDetails]:
    """Async invocation settled by callbacks needs the address the gateway reaches fastconn at.
    Guessing it from a wildcard ``listen`` would send every callback to the gateway's own
    loopback: each async call would then wait out ``callback_timeout`` and be re-invoked."""
    dispatch, server = data.get("dispatch") or {}, data.get("server") or {}
    sources = data.get("sources") or ()
    if not isinstance(dispatch, Mapping) or not isinstance(server, Mapping):
        return []
    if dispatch.get("async_ack", "on_callback") != "on_callback" or server.get("public_url"):
        return []
    uses_async = (
        dispatch.get("asynchronous_invocation") is True
        or any(isinstance(s, Mapping) and s.get("asynchronous_invocation") is True for s in sources)
        or any(isinstance(f, Mapping) and f.get("asynchronous") is True for f in functions)
    )
    listen = server.get("listen", "127.0.0.1:8081")
    if not uses_async or not isinstance(listen, str):
        return []
    host = listen.rpartition(":")[0]
    if host not in _UNSPECIFIED_HOSTS:
        return []
    message = (
        f"asynchronous invocation sends the gateway a callback URL, and listen = {listen!r} does not "
        "say where the gateway can reach fastconn: set server.public_url (e.g. "
        '"http://fastconn.openfaas:8081"), or dispatch.async_ack = "on_accept"'
    )
    return [_error(message, ("server", "public_url"), MISSING)]


# --------------------------------------------------------------------------------------------------
# Error plumbing
# --------------------------------------------------------------------------------------------------

_Loc = tuple[int | str, ...]


def _error(message: str, loc: _Loc, value: object, kind: str = "fastconn_config") -> InitErrorDetails:
    # "{message}" as the template with the text in the context, so braces in messages are not
    # interpreted as format fields.
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value
    )


def _rewrap(err: ErrorDetails, loc: _Loc) -> InitErrorDetails:
    """Re-raise an error at another location, keeping its type and message."""
    return _error(err["msg"], loc, err["input"], err["type"])


def _friendly(err: ErrorDetails, data: Any) -> InitErrorDetails:
    kind, loc, message, value = err["type"], err["loc"], err["msg"], err["input"]
    if kind == "missing":
        # pydantic's input for a missing key is the enclosing table, which is noise.
        message, value = "required key is missing", MISSING
    elif kind == "extra_forbidden":
        message = _unknown_key_message(_model_at(loc[:-1], data), loc)
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind in ("too_short", "string_too_short") and err.get("ctx", {}).get("min_length") == 1:
        message = "must not be empty"
    return _error(message, loc, value, kind)


def _unknown_key_message(model: type[BaseModel] | None, loc: _Loc) -> str:
    key = str(loc[-1])
    message = "unknown key"
    if model is not None:
        allowed = sorted(model.model_fields)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        message = f"unknown key{hint} (allowed: {', '.join(allowed)})"
    if len(loc) > 1 and key in Config.model_fields:
        # The classic TOML mistake: a top-level key written after a [table] header belongs to
        # that table.
        message += f"; {key!r} is a top-level key: to mean that, move it above the first [section]"
    return message


def _model_at(loc: _Loc, data: Any) -> type[BaseModel] | None:
    """The model class validating the table at ``loc`` (for listing its allowed keys), if known."""
    model: type[BaseModel] = Config
    raw: Any = data
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation: Any = model.model_fields[part].annotation
        raw = raw.get(part) if isinstance(raw, Mapping) else None
        if get_origin(annotation) is tuple:
            index = parts.pop(0) if parts else None
            if not isinstance(index, int):
                return None
            raw = raw[index] if isinstance(raw, Sequence) and index < len(raw) else None
            annotation = get_args(annotation)[0]
        if model is Config and part == "sources":
            # Source tables are typed by their "type" key, not by an annotation.
            if not (isinstance(raw, Mapping) and isinstance(raw.get("type"), str)):
                return None
            try:
                annotation = source_config_model(raw["type"])
            except LookupError:
                return None
        candidates = [annotation, *get_args(annotation)]  # unwraps "X | None"
        found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _format_loc(loc: _Loc) -> str:
    """``("functions", 0, "topics")`` -> ``"functions[0].topics"``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:  # a quoted TOML key such as "a.b"
            text += f"[{part!r}]"
    return text or "config"


def _to_problems(exc: ValidationError, env_origins: Mapping[_Loc, str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for err in exc.errors():
        loc = err["loc"]
        value = MISSING if err["type"] == "missing" else err["input"]
        location = _format_loc(loc)
        for origin, env_name in env_origins.items():
            if loc[: len(origin)] == origin:
                # The bad value came from the environment; point there, not at the file.
                location = f"env:{env_name}"
                break
        problems.append(ConfigProblem(location, err["msg"].removeprefix("Value error, "), value))
    return problems


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"invalid boolean {text!r}: expected true/false, 1/0 or yes/no")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _strip(text: str) -> str:
    return text.strip()


def _verbatim(text: str) -> str:
    return text  # topic_delimiter may legitimately be whitespace


# (env var, config path, converter). Order matters: gateway_url first, since it may create the
# [gateway] section the other gateway overrides need.
_ENV_OVERRIDES: Final[tuple[tuple[str, tuple[str, ...], Callable[[str], object]], ...]] = (
    ("gateway_url", ("gateway", "url"), _strip),
    ("upstream_timeout", ("gateway", "upstream_timeout"), parse_duration),
    ("rebuild_interval", ("gateway", "rebuild_interval"), parse_duration),
    ("basic_auth", ("gateway", "basic_auth"), _parse_bool),
    ("secret_mount_path", ("gateway", "secret_mount_path"), _strip),
    ("topic_delimiter", ("gateway", "topic_delimiter"), _verbatim),
    ("topics", ("topics",), _parse_list),
    ("content_type", ("dispatch", "content_type"), _strip),
    ("asynchronous_invocation", ("dispatch", "asynchronous_invocation"), _parse_bool),
    ("print_response", ("dispatch", "print_response"), _parse_bool),
    ("print_response_body", ("dispatch", "print_response_body"), _parse_bool),
    ("print_request_body", ("dispatch", "print_request_body"), _parse_bool),
)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[_Loc, str], list[ConfigProblem]]:
    """Apply OpenFaaS env overrides to ``data`` in place.

    Returns which config paths came from which variable (so later validation errors can point at the
    variable) and the problems found converting values. Empty variables are ignored, as deployment
    templates often define them empty.
    """
    origins: dict[_Loc, str] = {}
    problems: list[ConfigProblem] = []
    for env_name, path, convert in _ENV_OVERRIDES:
        raw = env.get(env_name)
        if raw is None or raw == "":
            continue
        try:
            value = convert(raw)
        except ValueError as exc:
            problems.append(ConfigProblem(f"env:{env_name}", str(exc), raw))
            continue
        *section_path, key = path
        target: Any = data
        if section_path:
            (section_name,) = section_path
            if section_name not in data:
                if section_name == "gateway" and env_name != "gateway_url":
                    # Creating [gateway] here would silently turn on gateway discovery at the
                    # default URL; an override of a section that does not exist is a mistake.
                    message = "applies to [gateway], which is not configured (set gateway_url or add it)"
                    problems.append(ConfigProblem(f"env:{env_name}", message, raw))
                    continue
                data[section_name] = {}
            target = data[section_name]
            if not isinstance(target, dict):
                continue  # the section's own type error is reported by validation
        target[key] = value
        origins[tuple(path)] = env_name
    return origins, problems


_TOML_POSITION: Final = re.compile(r"\(at line (\d+), column (\d+)\)")


def _read_toml(path: Path) -> dict[str, Any]:
    location = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError.single(location, "config file not found") from None
    except OSError as exc:
        raise ConfigError.single(location, f"cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.single(location, f"config file is not UTF-8 (byte offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib (3.11) exposes the position only in the message: "... (at line 3, column 5)".
        # Show the offending line as the value so the user sees it without opening the file.
        value: object = MISSING
        match = _TOML_POSITION.search(str(exc))
        if match:
            lines = text.splitlines()
            line_no = int(match.group(1))
            if 1 <= line_no <= len(lines):
                value = lines[line_no - 1]
        raise ConfigError.single(location, f"invalid TOML: {exc}", value) from None


def _validate(
    data: Mapping[str, Any], env_origins: Mapping[_Loc, str], problems: list[ConfigProblem]
) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        found = _to_problems(exc, env_origins)
        # A field's own bound says more than "out of range": report each location once.
        reported = {p.location for p in found}
        problems = [*(p for p in problems if p.location not in reported), *found]
    else:
        if not problems:
            return config
    raise ConfigError(problems)


def validate_config(data: Mapping[str, Any]) -> Config:
    """Validate an already-parsed config table (no file, no environment); raises :class:`ConfigError`."""
    return _validate(data, {}, _out_of_range_integers(data))


_INT64: Final = range(-(2**63), 2**63)


def _out_of_range_integers(data: Any, loc: _Loc = ()) -> list[ConfigProblem]:
    """TOML integers are 64-bit ("if an integer cannot be represented losslessly, an error must
    be thrown"), but Python's tomllib reads any size: refuse bigger ones here, before a field
    without its own bound hands one to code that cannot take it."""
    if isinstance(data, bool):
        return []
    if isinstance(data, int):
        if data in _INT64:
            return []
        return [ConfigProblem(_format_loc(loc), "integer out of range: TOML integers are 64-bit", data)]
    if isinstance(data, Mapping):
        return [p for key, value in data.items() for p in _out_of_range_integers(value, (*loc, str(key)))]
    if isinstance(data, list | tuple):
        return [p for i, value in enumerate(data) for p in _out_of_range_integers(value, (*loc, i))]
    return []


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load, override and validate the configuration.

    ``path`` is the TOML file; ``None`` means ``$FASTCONN_CONFIG`` if set, else an empty config
    (everything from defaults and the environment). ``env`` defaults to :data:`os.environ`; the
    OpenFaaS variables in it override the file. Raises :class:`ConfigError` listing every problem.
    """
    if env is None:
        env = os.environ
    if path is None:
        path = env.get("FASTCONN_CONFIG") or None
    data: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    env_origins, problems = _apply_env(data, env)
    problems = [*_out_of_range_integers(data), *problems]
    return _validate(data, env_origins, problems)
