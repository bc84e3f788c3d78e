"""What the ``nats`` and ``jetstream`` sources share: connection options (servers, TLS, auth),
the connection itself, subject checks and the mapping of NATS headers to HTTP headers.

A private module (leading underscore): not a source type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fastconn._compat import nats_can_write_raw, nats_write_raw
from fastconn.durations import Duration
from fastconn.errors import SourceError
from fastconn.headers import passthrough
from fastconn.health import ConnectionHealth, describe_error, display_servers
from fastconn.ratelimit import RateLimitedLog  # re-exported: the NATS sources import it from here
from fastconn.record_split import Decode
from fastconn.redact import redact_text
from fastconn.tls_config import client_tls_context, tls_pair_problem

__all__ = [
    "NatsConnectionConfig",
    "RateLimitedLog",
    "check_subject",
    "connect",
    "connection_health",
    "http_headers",
    "sanitize_header_value",
]

DEFAULT_SERVER: Final = "nats://127.0.0.1:4222"
_DEFAULT_PORT: Final = 4222
_SCHEMES: Final = ("nats", "tls", "ws", "wss")

_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_WHITESPACE: Final = re.compile(r"\s")


# -- subjects --------------------------------------------------------------------------------


def check_subject(subject: str, *, wildcards: bool = True) -> str | None:
    """Why ``subject`` is not a valid NATS subject (None when it is)."""
    if not subject:
        return "must not be empty"
    if _WHITESPACE.search(subject):
        return "must not contain whitespace"
    tokens = subject.split(".")
    if any(not t for t in tokens):
        return "must not have empty tokens (leading, trailing or double '.')"
    for i, token in enumerate(tokens):
        if token in ("*", ">"):
            if not wildcards:
                return "must not contain wildcards"
            if token == ">" and i != len(tokens) - 1:
                return "'>' is only allowed as the last token"
    return None


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject matched by ``subject`` (itself possibly a pattern) is also matched
    by ``pattern``."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">":
            return False
        if token != "*" and (s[i] == "*" or token != s[i]):
            return False
    return len(p) == len(s)


def subjects_intersect(a: str, b: str) -> bool:
    """Whether some subject is matched by both patterns."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        tx = x[i] if i < len(x) else None
        ty = y[i] if i < len(y) else None
        if tx == ">" or ty == ">":
            return tx is not None and ty is not None
        if tx is None or ty is None:
            return False
        if "*" not in (tx, ty) and tx != ty:
            return False
    return True


def minimal_subjects(subjects: Iterable[str]) -> list[str]:
    """The subjects without those another one already covers (a message matching two
    subscriptions would be delivered twice)."""
    unique = sorted(set(subjects))
    return [s for s in unique if not any(o != s and subject_covers(o, s) for o in unique)]


# -- headers ---------------------------------------------------------------------------------


def http_headers(
    headers: Mapping[str, str] | None, reserved: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """NATS headers as HTTP headers, through fastconn's one header policy
    (:mod:`fastconn.headers`); ``reserved``: the source's own names (lower case)."""
    if not headers:
        return []
    return passthrough(headers.items(), source_reserved=reserved)


def sanitize_header_value(text: str, limit: int = 256) -> str:
    """A single-line, bounded header value (for error texts and body excerpts)."""
    cleaned = _BAD_VALUE.sub(" ", text.replace("\r\n", " ").replace("\n", " ").replace("\t", " "))
    cleaned = cleaned.strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# -- configuration ---------------------------------------------------------------------------


def _normalize_server(url: str) -> str:
    text = url.strip()
    if "://" not in text:
        text = f"nats://{text}"  # OpenFaaS broker_host is a bare host name
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} is not a valid NATS URL") from None
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r}: expected nats://host[:port] (or tls://, ws://, wss://)")
    if port is None and parts.scheme in ("nats", "tls"):
        text = f"{parts.scheme}://{parts.netloc}:{_DEFAULT_PORT}{parts.path}"
    return text


class NatsConnectionConfig(BaseModel):
    """Connection keys shared by ``type = "nats"`` and ``type = "jetstream"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: tuple[str, ...] = Field(default=(DEFAULT_SERVER,), min_length=1)
    """NATS server URLs; a bare host gets ``nats://`` and port 4222. Env ``broker_host`` is used
    when the key is absent (the OpenFaaS nats-connector setting)."""
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed: str | None = None
    """A seed file's path, or the seed itself (a value starting with ``SU``)."""
    connect_timeout: Duration = Field(default=5.0, gt=0)
    """Timeout of one connection attempt."""
    connect_wait: Duration = Field(default=30.0, gt=0)
    """How long start-up keeps retrying the first connection before failing."""
    reconnect_wait: Duration = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _broker_host(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "servers" not in data:
            host = os.environ.get("broker_host", "").strip()
            if host:
                return {**data, "servers": [h.strip() for h in host.split(",") if h.strip()]}
        return data

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_normalize_server(v) for v in value)

    @model_validator(mode="after")
    def _check_auth(self) -> NatsConnectionConfig:
        if (problem := tls_pair_problem(self.tls_cert, self.tls_key)) is not None:
            raise ValueError(problem)
        if self.password is not None and self.user is None:
            raise ValueError("password needs user")
        methods = [
            name
            for name, value in (
                ("user", self.user),
                ("token", self.token),
                ("creds_file", self.creds_file),
                ("nkey_seed", self.nkey_seed),
            )
            if value is not None
        ]
        if len(methods) > 1:
            raise ValueError(f"choose one authentication method, not {' and '.join(methods)}")
        return self

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert) or any(
            s.startswith(("tls://", "wss://")) for s in self.servers
        )


# -- connecting ------------------------------------------------------------------------------


def _tls_context(config: NatsConnectionConfig) -> ssl.SSLContext | None:
    if not config.uses_tls:
        return None
    return client_tls_context("NATS", config.tls_ca, config.tls_cert, config.tls_key)


def client_options(config: NatsConnectionConfig, name: str) -> dict[str, Any]:
    """The nats-py ``connect`` options for ``config`` (without the callbacks)."""
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": f"fastconn-{name}",
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": config.reconnect_wait,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        # Acknowledgements and replies are many small writes: a larger buffer flushes less often.
        "pending_size": 8 * 1024 * 1024,
    }
    tls = _tls_context(config)
    if tls is not None:
        options["tls"] = tls
    if config.user is not None:
        options["user"] = config.user
        options["password"] = config.password or ""
    if config.token is not None:
        options["token"] = config.token
    if config.creds_file is not None:
        options["user_credentials"] = config.creds_file
    if config.nkey_seed is not None:
        seed = config.nkey_seed.strip()
        if seed.startswith("SU") and not os.path.exists(seed):
            options["nkeys_seed_str"] = seed
        else:
            options["nkeys_seed"] = seed
    return options


async def connect(
    config: NatsConnectionConfig,
    *,
    name: str,
    log: logging.Logger,
    error_cb: Callable[[Exception], Awaitable[None]],
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    health: ConnectionHealth,
) -> Any:
    """Connects, reconnecting forever once connected. The first connection is retried for up to
    ``connect_wait``; a rejected authentication fails at once. Raises :class:`SourceError`.

    Once connected, outages go to ``health`` (logged once when down, once when back; readiness
    reads it) instead of one ``error_cb`` call and log line per failed reconnection."""
    import nats.errors
    from nats.aio.client import Client

    connecting = True
    errors: list[Exception] = []
    rejected = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if not connecting:
            if isinstance(exc, connection_dropped):
                health.lost()  # the reconnection that follows reports the outage
                return
            if client.is_reconnecting:
                health.failing(describe_error(exc))
                return
            await error_cb(exc)
            return
        errors.append(exc)
        text = str(exc).lower()
        if (
            isinstance(exc, nats.errors.AuthorizationError)
            or "authorization" in text
            or "authentication" in text
        ):
            rejected.set()
        else:
            log.warning("source %s: connecting to NATS failed (%r); retrying", name, exc)

    async def disconnected() -> None:
        if not connecting and not client.is_closed:  # not our own close()
            health.lost()

    async def reconnected() -> None:
        health.restored()
        if reconnected_cb is not None:
            await reconnected_cb()

    connection_dropped = (nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError)
    options = client_options(config, name)
    options.update(error_cb=on_error, disconnected_cb=disconnected, reconnected_cb=reconnected)
    client = Client()
    attempt = asyncio.ensure_future(client.connect(**options))
    refused = asyncio.ensure_future(rejected.wait())
    try:
        await asyncio.wait(
            {attempt, refused}, timeout=config.connect_wait, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        # Start-up cancelled (a stop signal): end the retrying attempt too, or it would keep
        # connecting in the background and hold the process up.
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        with contextlib.suppress(Exception):
            await client.close()
        raise
    finally:
        refused.cancel()
    servers = ", ".join(redact_text(server) for server in config.servers)  # user:password@
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        connecting = False
        return client
    attempt.cancel()
    await asyncio.gather(attempt, return_exceptions=True)
    with contextlib.suppress(Exception):
        await client.close()
    if attempt.done() and not attempt.cancelled() and attempt.exception() is not None:
        errors.append(attempt.exception())  # type: ignore[arg-type]
    last = f": {errors[-1]!r}" if errors else ""
    if rejected.is_set():
        why = "authentication rejected"
    else:
        why = f"no connection within connect_wait ({config.connect_wait:g}s)"
    raise SourceError(f"source {name!r}: cannot connect to NATS at {servers}: {why}{last}")


async def key_value_bucket(client: Any, bucket: str, *, create: bool, key_name: str) -> Any:
    """The JetStream key-value bucket ``bucket``, created (one revision kept) when missing and
    ``create``; else :class:`SourceError` naming ``key_name`` (the config key that allows it)."""
    from nats.js.errors import BucketNotFoundError

    js = client.jetstream()
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        if not create:
            raise SourceError(
                f"key-value bucket {bucket!r} does not exist: create it or set {key_name} = true"
            ) from None
        return await js.create_key_value(bucket=bucket, history=1)


def connection_health(config: NatsConnectionConfig, name: str, log: logging.Logger) -> ConnectionHealth:
    """The :class:`ConnectionHealth` of a NATS source (its servers, without credentials)."""
    return ConnectionHealth(name, display_servers(config.servers), log)


# -- JetStream acknowledgements --------------------------------------------------------------

ACK: Final = b""
"""An empty payload on the ack subject acknowledges (same as ``+ACK``)."""
PROGRESS: Final = b"+WPI"
TERM: Final = b"+TERM"


def nak(delay: float = 0.0) -> bytes:
    """The ``-NAK`` payload, with a redelivery delay when positive."""
    if delay <= 0:
        return b"-NAK"
    return b'-NAK {"delay": %d}' % int(delay * 1e9)


def parse_ack_subject(reply: str) -> tuple[str, int, int]:
    """``(stream, stream sequence, delivery count)`` from a JetStream ack subject (both the
    ``$JS.ACK.<stream>...`` and the domain-qualified ``$JS.ACK.<domain>.<account>.<stream>...``
    forms). Cheaper than building ``Msg.metadata``."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return tokens[2], int(tokens[5]), int(tokens[4])
    if len(tokens) >= 11:
        return tokens[4], int(tokens[7]), int(tokens[6])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


class AckWriter:
    """Acknowledgements (payload-only publishes to ack subjects) written in bulk: one socket
    write per settled batch instead of a publish call per message (see
    :func:`fastconn._compat.nats_write_raw`); falls back to ``publish``."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._fast = nats_can_write_raw(client)
        self._queued: list[tuple[str, bytes]] = []

    def add(self, subject: str, payload: bytes) -> None:
        self._queued.append((subject, payload))

    def __len__(self) -> int:
        return len(self._queued)

    async def flush(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        client = self._client
        if client is None or client.is_closed:
            return
        if self._fast and client.is_connected:
            blob = b"".join(b"PUB %s %d\r\n%s\r\n" % (s.encode(), len(p), p) for s, p in queued)
            await nats_write_raw(client, blob)
            return
        for subject, payload in queued:
            with contextlib.suppress(Exception):
                await client.publish(subject, payload)


def check_subjects(value: tuple[str, ...]) -> tuple[str, ...]:
    """Validates a list of subscription subjects (wildcards allowed)."""
    for subject in value:
        problem = check_subject(subject)
        if problem:
            raise ValueError(f"subject {subject!r} {problem}")
    return value


class NatsSourceOptions(NatsConnectionConfig):
    """What both NATS sources offer besides the connection: response routing and async calls."""

    response_subject: str | None = None
    """Publish every function's result (sync response or async callback) to this subject, with
    ``X-Function-Name``, ``X-Function-Status``, ``X-Call-Id`` and ``X-Message-Id`` headers."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/`` for this source's messages; the message
    settles when the callback reports the result (``[dispatch] async_ack``)."""
    decode: Decode = "none"
    """``s3``: every message is an S3/MinIO bucket notification (MinIO's NATS target): each
    record is delivered on its own, and the message settles once all are (see
    :mod:`fastconn.record_split`)."""

    @field_validator("response_subject")
    @classmethod
    def _check_response_subject(cls, value: str | None) -> str | None:
        problem = check_subject(value, wildcards=False) if value is not None else None
        if problem:
            raise ValueError(f"subject {value!r} {problem}")
        return value
