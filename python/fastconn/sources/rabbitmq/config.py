"""``[[sources]] type = "rabbitmq"``: the configuration model."""

from __future__ import annotations

import json
import os
import re
import ssl
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from yarl import URL

from fastconn.durations import Duration
from fastconn.record_split import Decode
from fastconn.secret_files import read_secret
from fastconn.tls_config import client_tls_context, tls_pair_problem

__all__ = ["Binding", "QueueSpec", "RabbitMQConfig"]

_NAME: Final = re.compile(r"[A-Za-z0-9_.:\-/]{1,200}")
_HEADER: Final = re.compile(r"[A-Za-z0-9_-]+")
_URL_ENV: Final = "rabbitmq_url"
_QUEUES_ENV: Final = "queues"
RETRY_MARK: Final = ".fastconn-retry."
"""In the names of the retry queues fastconn declares (``<queue>.fastconn-retry.<ms>ms``)."""


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r}: expected 1-200 letters, digits, '_', '.', ':', '-' or '/'")
    if RETRY_MARK in value:
        raise ValueError(f"{value!r}: names containing {RETRY_MARK!r} are fastconn's retry queues")
    return value


_Name = Annotated[str, BeforeValidator(lambda v: _check_name(v) if isinstance(v, str) else v)]


class QueueSpec(BaseModel):
    """One queue to consume, declared at start (an existing queue must have the same flags and
    arguments, or the broker refuses the declaration: the error names the difference)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name
    durable: bool = True
    auto_delete: bool = False
    exclusive: bool = False
    arguments: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Queue arguments, e.g. ``{"x-queue-type" = "quorum"}`` or ``{"x-single-active-consumer" = true}``."""


def _queue_entries(value: object) -> object:
    """A queue may be given as a bare name; the OpenFaaS env form is a JSON list string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list of queue names: {exc}") from None
        else:
            value = [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return tuple({"name": item} if isinstance(item, str) else item for item in value)
    return value


class Binding(BaseModel):
    """An exchange declared at start and bound to one of the source's queues."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exchange: _Name
    exchange_type: Literal["direct", "fanout", "topic", "headers", "x-consistent-hash"] = "topic"
    routing_key: str = "#"
    queue: _Name | None = None
    """Which of ``queues`` to bind; may be left out when there is only one."""
    durable: bool = True


class RabbitMQConfig(BaseModel):
    """``[[sources]] type = "rabbitmq"``: consumers on RabbitMQ queues, acknowledging after
    every target function succeeded (at-least-once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["rabbitmq"] = "rabbitmq"
    name: str = Field(default="rabbitmq", min_length=1)
    url: str = Field(default="", validate_default=True)
    """``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS); default: env ``rabbitmq_url``."""
    username_file: str | None = None
    """A file holding the user name (a mounted secret): replaces the URL's."""
    password_file: str | None = None
    """A file holding the password: replaces the URL's."""
    tls_ca: str | None = None
    """With ``amqps://``: PEM bundle of the CA that signed the broker's certificate (default: the
    system's). The broker's host name is checked against its certificate."""
    tls_cert: str | None = None
    """With ``amqps://``: PEM client certificate (mutual TLS, e.g. the EXTERNAL mechanism's peer)."""
    tls_key: str | None = None
    """Private key (PEM) of ``tls_cert``."""
    queues: Annotated[tuple[QueueSpec, ...], BeforeValidator(_queue_entries)] = ()
    """Queue names, or tables ``{name, durable, auto_delete, exclusive, arguments}``; default: env
    ``queues`` (the OpenFaaS connector's JSON list). The topic of a message is its queue's name."""
    bindings: tuple[Binding, ...] = ()
    prefetch: int | None = Field(default=None, ge=1, le=65535)
    """Unacknowledged messages the broker may hand this replica, split evenly between the queues;
    default: the dispatcher's capacity, so the broker keeps what fastconn cannot take yet."""
    ordering: Literal["none", "key"] = "none"
    ordering_key: str = "routing_key"
    """With ``ordering = "key"``: ``routing_key``, or the name of a header holding the key."""
    max_deliver: int = Field(default=5, ge=-1)
    """Deliveries before a message fails for good (dead-lettered, or kept); -1: unlimited."""
    retry_delay: Duration = Field(default=1.0, gt=0)
    """Wait before the first redelivery of a failed message; doubles per delivery."""
    backoff_max: Duration = Field(default=60.0, gt=0)
    dead_letter_exchange: str | None = None
    """Where messages that failed for good are published (with failure context headers) before
    they are acknowledged. Unset: they are kept and retried every ``backoff_max``."""
    dead_letter_routing_key: str | None = None
    """Routing key of dead letters; default: the message's original routing key."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; the ack waits for the callbacks."""
    decode: Decode = "none"
    """``s3``: every message is an S3/MinIO bucket notification (MinIO's AMQP target): each
    record is delivered on its own, and the message is acknowledged once all are settled (see
    :mod:`fastconn.record_split`)."""
    startup_timeout: Duration = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if not data.get("url") and os.environ.get(_URL_ENV, "").strip():
            data = {**data, "url": os.environ[_URL_ENV].strip()}
        if not data.get("queues") and os.environ.get(_QUEUES_ENV, "").strip():
            data = {**data, "queues": os.environ[_QUEUES_ENV]}
        return data

    @model_validator(mode="after")
    def _check(self) -> RabbitMQConfig:
        if not self.url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                "url: expected amqp://user:password@host:5672/vhost or amqps://... (or env rabbitmq_url)"
            )
        if (problem := tls_pair_problem(self.tls_cert, self.tls_key)) is not None:
            raise ValueError(problem)
        if (self.tls_ca or self.tls_cert) and not self.url.startswith("amqps://"):
            raise ValueError("tls_ca/tls_cert need an amqps:// url (TLS); amqp:// is plain TCP")
        if self.password_file is not None and self.username_file is None and not URL(self.url).user:
            raise ValueError("password_file needs a user: in the url (amqp://user@host/) or username_file")
        if not self.queues:
            raise ValueError("queues: required, a list of queue names (or env queues)")
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError(f"queues: a queue is listed twice in {names}")
        for i, binding in enumerate(self.bindings):
            if binding.queue is None and len(names) > 1:
                raise ValueError(f"bindings[{i}]: set queue (one of {names}): there are several queues")
            if binding.queue is not None and binding.queue not in names:
                raise ValueError(f"bindings[{i}].queue: {binding.queue!r} is not one of queues {names}")
        if self.backoff_max < self.retry_delay:
            raise ValueError(f"backoff_max must be >= retry_delay ({self.retry_delay:g}s)")
        if self.max_deliver == 0:
            raise ValueError("max_deliver: must be at least 1, or -1 for unlimited")
        if self.ordering_key != "routing_key" and not _HEADER.fullmatch(self.ordering_key):
            raise ValueError("ordering_key: must be 'routing_key' or a header name")
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise ValueError("dead_letter_routing_key needs dead_letter_exchange")
        return self

    def connection_url(self) -> URL:
        """``url`` with the user name and password from their files (read now: a rotated secret
        applies at the next start). Raises :class:`SourceError` naming an unreadable file."""
        url = URL(self.url)
        owner = f"source {self.name!r}"
        if self.username_file is not None:
            url = url.with_user(read_secret(self.username_file, "username_file", owner))
        if self.password_file is not None:
            url = url.with_password(read_secret(self.password_file, "password_file", owner))
        return url

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context of an ``amqps://`` url (None for ``amqp://``)."""
        if not self.url.startswith("amqps://"):
            return None
        return client_tls_context(f"source {self.name!r}", self.tls_ca, self.tls_cert, self.tls_key)

    def binding_queue(self, binding: Binding) -> str:
        return binding.queue or self.queues[0].name
