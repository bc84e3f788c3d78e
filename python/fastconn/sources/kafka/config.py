"""``[[sources]] type = "kafka"``: the configuration model and the aiokafka client options
built from it."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from aiokafka.helpers import create_ssl_context
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fastconn.durations import Duration
from fastconn.errors import SourceError
from fastconn.secrets import read_secret

__all__ = [
    "KafkaConfig",
    "client_options",
    "consumer_options",
    "is_topic_name",
    "producer_options",
]

_BROKER = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_OFFSET_ALIASES = {"oldest": "earliest", "newest": "latest", "smallest": "earliest", "largest": "latest"}


def _split_list(value: object) -> object:
    """``"a:9092, b:9092"`` (the OpenFaaS env form) is accepted as well as a list."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _offset_alias(value: object) -> object:
    # The OpenFaaS Pro connector says oldest/newest; Kafka itself says earliest/latest.
    return _OFFSET_ALIASES.get(value, value) if isinstance(value, str) else value


def _check_topic(value: str) -> str:
    if not _TOPIC.fullmatch(value):
        raise ValueError("expected a Kafka topic name: 1-249 letters, digits, '.', '_' or '-'")
    return value


_Topic = Annotated[str, Field(min_length=1)]
_PositiveDuration = Annotated[Duration, Field(gt=0)]
_NonEmpty = Annotated[str, Field(min_length=1)]


class KafkaConfig(BaseModel):
    """``[[sources]] type = "kafka"``: a consumer group member feeding functions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kafka"] = "kafka"
    name: _NonEmpty = "kafka"
    brokers: Annotated[tuple[_NonEmpty, ...], BeforeValidator(_split_list)] = Field(
        default=(), validate_default=True
    )
    """Bootstrap ``host:port`` list; default from env ``broker_hosts`` (comma list) or
    ``broker_host`` (the OpenFaaS connectors' variables)."""
    topics: Annotated[tuple[_Topic, ...], BeforeValidator(_split_list)] = ()
    """Topics to consume; default: the connector-wide ``topics``, else the topic map's topics
    (re-subscribed whenever the functions' topics change)."""
    topic_pattern: str | None = None
    """A regex of topics to consume instead of ``topics`` (new matching topics join)."""
    group_id: _NonEmpty = "fastconn"
    client_id: _NonEmpty = "fastconn"
    initial_offset: Annotated[Literal["earliest", "latest"], BeforeValidator(_offset_alias)] = "earliest"
    """Where a group without a committed offset starts (``oldest``/``newest`` accepted)."""
    # aiokafka sends fetch sizes as 32-bit signed integers.
    max_bytes: Annotated[int, Field(ge=1024, le=2**31 - 1 - 65536)] = 1048576
    """Most bytes fetched per partition per request (Kafka ``max.partition.fetch.bytes``)."""
    fetch_max_wait: _PositiveDuration = 0.1
    """How long the broker may hold a fetch that has no data (``fetch.max.wait.ms``). Brokers
    that answer only when this runs out (not every Kafka-protocol server wakes a waiting fetch
    on new data) add up to this much latency to the first message of a burst."""
    ordering: Literal["key", "partition", "none"] = "key"
    max_pending_per_partition: Annotated[int, Field(ge=1)] = 1000
    """Messages of one partition fetched and not yet below its committed watermark (in flight,
    retrying, or done behind an unfinished one) before the partition is paused."""
    max_poll_records: Annotated[int, Field(ge=1)] = 500
    """Most records taken per fetch (and handed to the core in one call)."""
    commit_interval: _PositiveDuration = 1.0
    revoke_timeout: Duration = 10.0
    """How long a revoked partition's in-flight calls may take before it is released anyway."""
    retry_backoff_initial: _PositiveDuration = 1.0
    """First wait before redelivering a message that failed after the dispatcher's retries."""
    retry_backoff_max: _PositiveDuration = 60.0
    dead_letter_topic: _NonEmpty | None = None
    """Where messages that failed for good go, with failure context headers. Unset: they are
    retried forever instead."""
    response_topic: _NonEmpty | None = None
    """Publish every function's response here (keyed like the input)."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; the offset waits for the callbacks."""
    session_timeout: _PositiveDuration = 10.0
    heartbeat_interval: _PositiveDuration = 3.0
    max_poll_interval: _PositiveDuration = 300.0
    metadata_max_age: _PositiveDuration = 30.0
    """How often topic metadata is refreshed (new partitions, new topics for a pattern)."""
    startup_timeout: Duration = 60.0
    """How long start-up keeps trying to reach the brokers before giving up."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """Default ``PLAIN`` with a ``SASL_*`` protocol."""
    sasl_username: _NonEmpty | None = None
    sasl_username_file: _NonEmpty | None = None
    sasl_password: _NonEmpty | None = None
    sasl_password_file: _NonEmpty | None = None
    tls_ca: _NonEmpty | None = None
    """PEM file of the CA that signed the brokers' certificates (default: the system's)."""
    tls_cert: _NonEmpty | None = None
    """PEM client certificate (mutual TLS)."""
    tls_key: _NonEmpty | None = None
    """PEM private key of ``tls_cert`` (when not in the same file)."""

    @model_validator(mode="before")
    @classmethod
    def _brokers_from_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("brokers"):
            for variable in ("broker_hosts", "broker_host"):
                value = os.environ.get(variable, "").strip()
                if value:
                    return {**data, "brokers": value}
        return data

    @field_validator("brokers", mode="after")
    @classmethod
    def _check_brokers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("required: a list of host:port (or env broker_hosts / broker_host)")
        for broker in value:
            if not _BROKER.fullmatch(broker):
                raise ValueError(f"expected host:port, got {broker!r}")
        return value

    @field_validator("topics", mode="after")
    @classmethod
    def _check_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic in value:
            _check_topic(topic)
        return value

    @field_validator("topic_pattern")
    @classmethod
    def _check_pattern(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("topics"):
            raise ValueError("set either topics or topic_pattern, not both")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("dead_letter_topic", "response_topic")
    @classmethod
    def _check_output_topic(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        _check_topic(value)
        pattern = info.data.get("topic_pattern")
        if value in info.data.get("topics", ()) or (pattern and re.fullmatch(pattern, value)):
            raise ValueError("must not be one of the consumed topics (messages would loop)")
        return value

    @field_validator("retry_backoff_max")
    @classmethod
    def _backoff_ordered(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("retry_backoff_initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be >= retry_backoff_initial ({initial:g}s)")
        return value

    @field_validator("heartbeat_interval")
    @classmethod
    def _heartbeat_below_session(cls, value: float, info: ValidationInfo) -> float:
        session = info.data.get("session_timeout")
        if session is not None and value >= session:
            raise ValueError(f"must be below session_timeout ({session:g}s)")
        return value

    @field_validator(
        "sasl_mechanism", "sasl_username", "sasl_username_file", "sasl_password", "sasl_password_file"
    )
    @classmethod
    def _sasl_needs_sasl_protocol(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("security_protocol", "PLAINTEXT")
        if value is not None and not protocol.startswith("SASL_"):
            raise ValueError(f"needs security_protocol SASL_PLAINTEXT or SASL_SSL (is {protocol})")
        pair = {"sasl_username_file": "sasl_username", "sasl_password_file": "sasl_password"}
        other = pair.get(info.field_name or "")
        if value is not None and other and info.data.get(other) is not None:
            raise ValueError(f"set either {other} or {info.field_name}, not both")
        return value

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _tls_needs_tls_protocol(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("security_protocol", "PLAINTEXT")
        if value is not None and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"needs security_protocol SSL or SASL_SSL (is {protocol})")
        if value is not None and info.field_name == "tls_key" and info.data.get("tls_cert") is None:
            raise ValueError("needs tls_cert (the certificate of this key)")
        return value

    @model_validator(mode="after")
    def _sasl_credentials(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name, given in (
                    ("sasl_username", self.sasl_username or self.sasl_username_file),
                    ("sasl_password", self.sasl_password or self.sasl_password_file),
                )
                if not given
            ]
            if missing:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs "
                    f"{' and '.join(missing)} (or the _file variant)"
                )
        return self


def _read_secret(path: str, what: str) -> str:
    return read_secret(path, what, "kafka")


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """The aiokafka keyword arguments shared by the consumer and the producer: brokers,
    client id and security (SASL credentials read from their files, TLS files loaded into an
    ``ssl.SSLContext``). Raises :class:`SourceError` when a file cannot be read."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.brokers),
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
    }
    if config.security_protocol.startswith("SASL_"):
        username = config.sasl_username or _read_secret(str(config.sasl_username_file), "sasl username")
        password = config.sasl_password or _read_secret(str(config.sasl_password_file), "sasl password")
        options["sasl_mechanism"] = config.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = username
        options["sasl_plain_password"] = password
    if config.security_protocol in ("SSL", "SASL_SSL"):
        try:
            options["ssl_context"] = create_ssl_context(
                cafile=config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise SourceError(f"kafka: cannot load TLS files (tls_ca/tls_cert/tls_key): {exc}") from None
    return options


def consumer_options(config: KafkaConfig) -> dict[str, Any]:
    """Everything ``AIOKafkaConsumer`` is built with (see :func:`client_options`)."""
    rebalance = max(config.session_timeout, config.revoke_timeout + 5.0)
    return {
        **client_options(config),
        "group_id": config.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": config.initial_offset,
        "max_partition_fetch_bytes": config.max_bytes,
        "fetch_max_wait_ms": int(config.fetch_max_wait * 1000),
        "fetch_max_bytes": max(52428800, config.max_bytes),
        "session_timeout_ms": int(config.session_timeout * 1000),
        "heartbeat_interval_ms": int(config.heartbeat_interval * 1000),
        "rebalance_timeout_ms": int(rebalance * 1000),
        "max_poll_interval_ms": int(config.max_poll_interval * 1000),
        "metadata_max_age_ms": int(config.metadata_max_age * 1000),
    }


def producer_options(config: KafkaConfig) -> dict[str, Any]:
    return {
        **client_options(config),
        "acks": "all",
        "linger_ms": 5,
        # Dead letters carry the whole input message plus context headers.
        "max_request_size": config.max_bytes + 65536,
    }


def is_topic_name(name: str) -> bool:
    """Whether ``name`` can be a Kafka topic (topic maps may name NATS subjects and such)."""
    return _TOPIC.fullmatch(name) is not None
