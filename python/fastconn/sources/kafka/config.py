"""``[[sources]] type = "kafka"``: the configuration model and the aiokafka client options
built from it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fastconn.durations import Duration
from fastconn.record_split import Decode
from fastconn.secret_files import secret_or_file
from fastconn.sources._kafka_connection import KafkaConnectionConfig, is_topic_name, split_list
from fastconn.tls_config import client_tls_context

__all__ = [
    "KafkaConfig",
    "KafkaConnectionConfig",
    "client_options",
    "consumer_options",
    "is_topic_name",
    "producer_options",
]

_OFFSET_ALIASES = {"oldest": "earliest", "newest": "latest", "smallest": "earliest", "largest": "latest"}


def _offset_alias(value: object) -> object:
    # The OpenFaaS Pro connector says oldest/newest; Kafka itself says earliest/latest.
    return _OFFSET_ALIASES.get(value, value) if isinstance(value, str) else value


def _check_topic(value: str) -> str:
    if not is_topic_name(value):
        raise ValueError("expected a Kafka topic name: 1-249 letters, digits, '.', '_' or '-'")
    return value


_Topic = Annotated[str, Field(min_length=1)]
_PositiveDuration = Annotated[Duration, Field(gt=0)]
_NonEmpty = Annotated[str, Field(min_length=1)]


class KafkaConfig(KafkaConnectionConfig):
    """``[[sources]] type = "kafka"``: a consumer group member feeding functions."""

    type: Literal["kafka"] = "kafka"
    name: _NonEmpty = "kafka"
    topics: Annotated[tuple[_Topic, ...], BeforeValidator(split_list)] = ()
    """Topics to consume; default: the connector-wide ``topics``, else the topic map's topics
    (re-subscribed whenever the functions' topics change)."""
    topic_pattern: str | None = None
    """A regex of topics to consume instead of ``topics`` (new matching topics join)."""
    group_id: _NonEmpty = "fastconn"
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
    decode: Decode = "none"
    """``s3``: every record value is an S3/MinIO bucket notification (MinIO's Kafka target):
    each S3 record is delivered on its own, and the offset moves once all are settled (see
    :mod:`fastconn.record_split`)."""
    session_timeout: _PositiveDuration = 10.0
    heartbeat_interval: _PositiveDuration = 3.0
    max_poll_interval: _PositiveDuration = 300.0
    metadata_max_age: _PositiveDuration = 30.0
    """How often topic metadata is refreshed (new partitions, new topics for a pattern)."""
    startup_timeout: Duration = 60.0
    """How long start-up keeps trying to reach the brokers before giving up."""
    stored_events: bool = False
    """The topics hold events a webhook with ``store = { type = "kafka" }`` accepted: route
    each by the topic it was accepted on, with the ``X-Message-Id`` of its 202, and pass the
    request's headers on as they came (see :mod:`fastconn.ingress_store`)."""

    @model_validator(mode="after")
    def _stored_events_name_their_topic(self) -> KafkaConfig:
        if self.stored_events and not (self.topics or self.topic_pattern):
            raise ValueError(
                "stored_events reads a webhook store's topic: set topics = [<the store's topic>] "
                "(else the functions' own topics would be read as stored events)"
            )
        if self.stored_events and self.decode != "none":
            raise ValueError(
                "decode = 's3' with stored_events: a webhook store holds requests its route already "
                "decoded (set decode = 's3' on the webhook instead)"
            )
        return self

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


def client_options(config: KafkaConnectionConfig) -> dict[str, Any]:
    """The aiokafka keyword arguments shared by the consumer and the producer: brokers,
    client id and security (SASL credentials read from their files, TLS files loaded into an
    ``ssl.SSLContext``). Raises :class:`SourceError` when a file cannot be read."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.brokers),
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
    }
    if config.security_protocol.startswith("SASL_"):
        username = secret_or_file(
            config.sasl_username, config.sasl_username_file, "sasl_username_file", "kafka"
        )
        password = secret_or_file(
            config.sasl_password, config.sasl_password_file, "sasl_password_file", "kafka"
        )
        options["sasl_mechanism"] = config.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = username
        options["sasl_plain_password"] = password
    if config.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = client_tls_context("kafka", config.tls_ca, config.tls_cert, config.tls_key)
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
