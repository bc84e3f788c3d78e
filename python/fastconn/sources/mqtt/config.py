"""``[[sources]] type = "mqtt"``: the configuration model and what it derives (broker address,
subscription filters, credentials)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from fastconn.durations import Duration
from fastconn.record_split import Decode
from fastconn.secret_files import secret_or_file
from fastconn.tls_config import tls_pair_problem

__all__ = ["Broker", "MqttConfig", "check_filter"]

_SCHEMES: Final = {
    "tcp": ("tcp", False, 1883),
    "mqtt": ("tcp", False, 1883),
    "ssl": ("tcp", True, 8883),
    "mqtts": ("tcp", True, 8883),
    "tls": ("tcp", True, 8883),
    "ws": ("websockets", False, 80),
    "wss": ("websockets", True, 443),
}
MAX_SESSION_EXPIRY: Final = 0xFFFFFFFF
"""MQTT 5's "never expires"."""
MAX_RECEIVE: Final = 65535


@dataclass(frozen=True, slots=True)
class Broker:
    """Where to connect: ``transport`` is paho's (``tcp`` or ``websockets``)."""

    host: str
    port: int
    transport: str
    tls: bool
    path: str

    @property
    def display(self) -> str:
        scheme = (
            ("wss" if self.tls else "ws")
            if self.transport == "websockets"
            else ("ssl" if self.tls else "tcp")
        )
        return f"{scheme}://{self.host}:{self.port}{self.path if self.transport == 'websockets' else ''}"


def parse_broker(url: str) -> Broker:
    text = url.strip()
    if "://" not in text:
        text = f"tcp://{text}"  # the OpenFaaS -broker flag also takes host:port
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} is not a valid broker URL") from None
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError(f"{url!r}: expected tcp://host[:port] (or ssl://, ws://, wss://)")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password (or their _file keys), not in the URL")
    transport, tls, default_port = scheme
    return Broker(parts.hostname, port or default_port, transport, tls, parts.path or "/mqtt")


def check_filter(value: str, *, wildcards: bool = True) -> str | None:
    """Why ``value`` is not a valid MQTT topic filter (or topic name), or None."""
    if not value:
        return "must not be empty"
    if "\x00" in value:
        return "must not contain NUL"
    if len(value.encode()) > MAX_RECEIVE:
        return "is longer than 65535 bytes"
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level or "+" in level:
            if not wildcards:
                return "must not contain the wildcards + or #"
            if level not in ("#", "+"):
                return "has a wildcard inside a level (+ and # stand alone between '/')"
            if level == "#" and i != len(levels) - 1:
                return "has '#' before the last level"
    return None


def _protocol(value: Any) -> Any:
    # TOML ``protocol = 5`` is an integer; 3.1.1 can only be a string.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    return value


class MqttConfig(BaseModel):
    """``[[sources]] type = "mqtt"``: MQTT subscriptions, acknowledged after the functions
    succeeded (QoS 1 and 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mqtt"] = "mqtt"
    name: str = Field(default="mqtt", min_length=1)
    broker: str = "tcp://127.0.0.1:1883"
    """``tcp://host:port`` (default port 1883), ``ssl://`` (8883), ``ws://``/``wss://`` (path
    default ``/mqtt``). A bare ``host:port`` means ``tcp://``."""
    topics: tuple[str, ...] = ()
    """Topic filters (``+`` and ``#`` allowed); empty: the connector-wide ``topics``, else the
    topic map's topics (re-subscribed as functions come and go)."""
    qos: Literal[0, 1, 2] = 1
    """Subscription QoS: the most the broker delivers with (a message keeps a lower QoS)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=256)
    """The session's identity; default ``fastconn-<name>-<hostname>``. A persistent session is
    found again only under the same id: set it for replicas whose host names change."""
    clean_start: bool = False
    """false: a persistent session (the broker keeps subscriptions and QoS 1/2 messages while
    fastconn is down, up to ``session_expiry``); true: start empty on every connect."""
    session_expiry: Duration = Field(default=86400.0, ge=0)
    """MQTT 5: how long the broker keeps the session after a disconnect (seconds or ``1d``);
    MQTT 3.1.1 sessions last until the broker's own ``persistent_client_expiration``."""
    username: str | None = None
    username_file: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    """CA bundle for ``ssl://``/``wss://`` (default: the system's)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_protocol)] = "5"
    shared_group: str | None = None
    """Subscribe as ``$share/<group>/<filter>``: replicas in one group split the messages."""
    ordering: Literal["none", "topic"] = "none"
    """``topic``: messages of one topic reach the functions one at a time, in arrival order."""
    max_deliver: int = Field(default=5, ge=-1)
    """Attempts (each after the dispatcher's own retries) before a retryable failure is final;
    -1: unlimited. MQTT has no negative acknowledgement: fastconn retries itself."""
    retry_delay: Duration = Field(default=1.0, gt=0)
    """Wait before the second attempt; doubles per attempt up to ``retry_delay_max``."""
    retry_delay_max: Duration = Field(default=60.0, gt=0)
    dead_letter_topic: str | None = None
    """Final failures are published here (QoS 1, failure context as MQTT 5 user properties),
    then acknowledged. Unset: logged, counted as failed and acknowledged."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; a message is acknowledged when the
    callbacks report success (``[dispatch] async_ack``)."""
    decode: Decode = "none"
    """``s3``: every message is an S3/MinIO bucket notification (MinIO's MQTT target): each
    record is delivered on its own, and the message is acknowledged once all are settled (see
    :mod:`fastconn.record_split`)."""
    receive_maximum: int | None = Field(default=None, ge=1, le=MAX_RECEIVE)
    """MQTT 5: unacknowledged QoS 1/2 messages the broker may send at once; default: the
    dispatcher's capacity. (MQTT 3.1.1: the broker's ``max_inflight_messages`` bounds it.)"""
    keepalive: Duration = Field(default=30.0, ge=5, le=65535)
    connect_wait: Duration = Field(default=30.0, gt=0)
    """How long start-up keeps trying the first connection before failing."""
    reconnect_wait: Duration = Field(default=1.0, gt=0)
    """First wait before reconnecting; doubles up to ``reconnect_wait_max``."""
    reconnect_wait_max: Duration = Field(default=30.0, gt=0)

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        parse_broker(value)
        return value

    @field_validator("topics")
    @classmethod
    def _check_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic in value:
            problem = check_filter(topic)
            if problem:
                raise ValueError(f"topic filter {topic!r} {problem}")
            if topic.startswith("$share/"):
                raise ValueError(f"topic filter {topic!r}: use shared_group instead of $share/ filters")
        return value

    @field_validator("dead_letter_topic")
    @classmethod
    def _check_dead_letter(cls, value: str | None) -> str | None:
        problem = check_filter(value, wildcards=False) if value is not None else None
        if problem:
            raise ValueError(f"topic {value!r} {problem}")
        return value

    @field_validator("shared_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError("a shared group name is not empty and has no '/', '+' or '#'")
        return value

    @field_validator("max_deliver")
    @classmethod
    def _check_max_deliver(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 for unlimited")
        return value

    @field_validator("session_expiry")
    @classmethod
    def _check_expiry(cls, value: float) -> float:
        if value > MAX_SESSION_EXPIRY:
            raise ValueError(f"must be at most {MAX_SESSION_EXPIRY} seconds (MQTT's 'never')")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> MqttConfig:
        for name in ("username", "password"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set either {name} or {name}_file, not both")
        if (self.password or self.password_file) and not (self.username or self.username_file):
            raise ValueError("password needs username (or username_file)")
        if (problem := tls_pair_problem(self.tls_cert, self.tls_key)) is not None:
            raise ValueError(problem)
        if (self.tls_ca or self.tls_cert) and not self.endpoint.tls:
            raise ValueError("tls_ca/tls_cert need an ssl:// or wss:// broker")
        if self.retry_delay_max < self.retry_delay:
            raise ValueError(f"retry_delay_max must be >= retry_delay ({self.retry_delay:g}s)")
        if self.reconnect_wait_max < self.reconnect_wait:
            raise ValueError(f"reconnect_wait_max must be >= reconnect_wait ({self.reconnect_wait:g}s)")
        if self.dead_letter_topic is not None and any(
            _matches(f, self.dead_letter_topic) for f in self.topics
        ):
            raise ValueError(
                f"dead_letter_topic {self.dead_letter_topic!r} is matched by this source's own topics: "
                "dead letters would come back"
            )
        return self

    # -- derived ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> Broker:
        return parse_broker(self.broker)

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    @property
    def session_client_id(self) -> str:
        return self.client_id or f"fastconn-{self.name}-{socket.gethostname()}"

    def subscription(self, topic_filter: str) -> str:
        """The filter as subscribed: within the shared group when there is one."""
        if self.shared_group:
            return f"$share/{self.shared_group}/{topic_filter}"
        return topic_filter

    def credentials(self) -> tuple[str, str | None] | None:
        """``(username, password)`` with the ``_file`` variants read; raises SourceError."""
        owner = f"source {self.name!r}"
        username = secret_or_file(self.username, self.username_file, "username_file", owner)
        if username is None:
            return None
        return username, secret_or_file(self.password, self.password_file, "password_file", owner)


def _matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (a name) matches ``topic_filter`` by MQTT's rules."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(t):
            return False
        if level == "+":
            if i == 0 and t[0].startswith("$"):
                return False
            continue
        if level != t[i]:
            return False
    return len(f) == len(t)
