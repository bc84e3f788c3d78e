"""``type = "kafka"``: consume topics in a consumer group and invoke the functions subscribed to
them, committing only offsets whose messages are done.

Delivery guarantees
-------------------
* **At least once, never past a gap.** Offsets are committed manually (never auto-commit), per
  partition, at the gap-free watermark (:mod:`fastconn.watermark`): the lowest offset that is not
  done. A message is *done* when every function it routes to answered 2xx, when no function
  subscribes to its topic, or when it was written to ``dead_letter_topic``. Commits happen every
  ``commit_interval``, when partitions are revoked, and at shutdown. After a crash the group
  resumes at the last commit: messages past it are delivered again (duplicates, never losses).
* **Ordering** (``ordering``): ``key`` (default) runs messages with the same record key one at a
  time in offset order, while other keys of the same partition run in parallel (keyless messages
  are unordered); ``partition`` runs one message per partition at a time; ``none`` runs
  everything in parallel. The per-key scheduler is the Rust core's.
* **Retries.** After the dispatcher's own retries, a RETRY verdict keeps the message: it is
  resubmitted after a growing backoff (at least the function's ``Retry-After``), forever. In
  ``key``/``partition`` mode its key stays held in the core meanwhile, so only that key (or
  partition) waits. A FAILED verdict (a non-retryable status such as 400) goes to
  ``dead_letter_topic`` with the failure context in headers and is then done; without a
  dead-letter topic it is retried like RETRY, forever. Nothing is dropped: stuck messages show in
  ``fastconn_kafka_stuck_messages`` and hold their partition's commit. (The core holds a key
  after RETRY verdicts only: a FAILED message retried for want of a dead-letter topic does not
  hold back the later messages of its key.)
* **Backpressure.** A partition is paused (not the consumer) when ``max_pending_per_partition``
  of its messages are past its watermark, and resumed when half of them are done; the whole
  fetch waits while the dispatcher is full. Memory is bounded by that budget plus aiokafka's one
  prefetched fetch (``max_bytes``) per partition.
* **Rebalances.** On revoke the partitions stop being fetched, their in-flight calls get up to
  ``revoke_timeout`` to finish, their watermarks are committed, then they are released. Messages
  past the committed offset (done, in flight or retrying) are read again by the next owner and
  counted in ``fastconn_kafka_rebalance_duplicates_total``. A message waiting for its
  redelivery while its key is held is redelivered at once on revoke, so the messages queued
  behind its key still follow it.
* **Shutdown.** Fetching and redeliveries stop; in-flight calls finish (``[dispatch]
  shutdown_timeout``); the watermarks are committed and the group is left. Messages waiting for
  a redelivery stay uncommitted and are read again by the next owner (messages queued behind a
  held key keep the dispatcher's drain waiting until ``shutdown_timeout``).

Headers sent to functions: ``X-Topic``, ``X-Kafka-Topic``, ``X-Kafka-Partition``,
``X-Kafka-Offset``, ``X-Kafka-Key`` (base64 plus ``X-Kafka-Key-Enc: b64``
when the key is not printable ASCII text), each record header as ``X-Kafka-<name>`` (base64 plus
``X-Kafka-<name>-Enc: b64`` likewise) and ``X-Message-Id`` = ``<topic>/<partition>/<offset>``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import re
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
)
from aiokafka.helpers import create_ssl_context
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
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
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.message import Message, Outcome, TargetResult, Verdict
from fastconn.responses import response_messages
from fastconn.source import SourceContext, wait_or_stop
from fastconn.watermark import Watermark

__all__ = ["CONFIG_MODEL", "KafkaConfig", "KafkaSource", "client_options", "create"]

log = logging.getLogger("fastconn.source.kafka")

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

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
    max_bytes: Annotated[int, Field(ge=1024)] = 1048576
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


CONFIG_MODEL = KafkaConfig


def create(config: KafkaConfig) -> KafkaSource:
    return KafkaSource(config)


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"kafka: cannot read {what} from {path!r}: {exc}") from None
    if not text:
        raise SourceError(f"kafka: {what} file {path!r} is empty")
    return text


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


# --------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^!#$%&'*+.^_`|~0-9A-Za-z-]")
_RESERVED = frozenset({"topic", "partition", "offset", "key", "key-enc"})


def _as_header_text(value: bytes) -> str | None:
    """The value as an HTTP header value when it is printable ASCII, else None (send base64)."""
    if not value.isascii():
        return None
    text = value.decode("ascii")
    return text if text.isprintable() else None


def _key_headers(headers: list[tuple[str, str]], key: bytes) -> None:
    text = _as_header_text(key)
    if text is None:
        headers.append(("X-Kafka-Key", base64.b64encode(key).decode()))
        headers.append(("X-Kafka-Key-Enc", "b64"))
    else:
        headers.append(("X-Kafka-Key", text))


def _record_headers(record_headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, str]]:
    """A record's own headers as ``X-Kafka-<name>``; names reduced to HTTP token characters."""
    headers: list[tuple[str, str]] = []
    for name, raw in record_headers:
        token = _TOKEN.sub("-", name).strip("-")
        lowered = token.lower()
        if not token or lowered in _RESERVED or lowered.endswith("-enc"):
            continue  # unrepresentable, or would spoof fastconn's own headers
        value = raw or b""
        text = _as_header_text(value)
        if text is None:
            headers.append((f"X-Kafka-{token}", base64.b64encode(value).decode()))
            headers.append((f"X-Kafka-{token}-Enc", "b64"))
        else:
            headers.append((f"X-Kafka-{token}", text))
    return headers


def function_headers(
    topic: str,
    partition: int,
    offset: int,
    *,
    key: bytes | None,
    record_headers: Sequence[tuple[str, bytes | None]] = (),
) -> list[tuple[str, str]]:
    """The ``X-Kafka-*`` headers of one record (``X-Topic`` and ``X-Message-Id`` come from the
    core). Values that are not printable ASCII go as base64 with a ``-Enc: b64`` companion."""
    headers = _record_headers(record_headers) if record_headers else []
    headers.append(("X-Kafka-Topic", topic))
    headers.append(("X-Kafka-Partition", str(partition)))
    headers.append(("X-Kafka-Offset", str(offset)))
    if key is not None:
        _key_headers(headers, key)
    return headers


# Dead-letter context headers (Kafka record headers on the dead-letter topic).
DLT_FUNCTION = "fastconn-dlt-function"
DLT_STATUS = "fastconn-dlt-status"
DLT_ATTEMPTS = "fastconn-dlt-attempts"
DLT_ERROR = "fastconn-dlt-error"
DLT_RESPONSE = "fastconn-dlt-response"
DLT_FAILED = "fastconn-dlt-failed-functions"
DLT_TOPIC = "fastconn-dlt-original-topic"
DLT_PARTITION = "fastconn-dlt-original-partition"
DLT_OFFSET = "fastconn-dlt-original-offset"
DLT_MESSAGE_ID = "fastconn-dlt-message-id"
DLT_DELIVERIES = "fastconn-dlt-deliveries"
DLT_TIME = "fastconn-dlt-time"
_RESPONSE_EXCERPT = 1024


def _error_text(result: TargetResult) -> str:
    if result.status:
        return f"HTTP {result.status}"
    return result.error.label


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Partition:
    """One assigned partition. A new object per assignment: outcomes that come back for an old
    (revoked) object are recognised and ignored."""

    tp: Any
    """aiokafka ``TopicPartition``."""
    order_prefix: bytes
    """Ordering keys are ``<topic>\\0<partition>\\0[<record key>]``: unique across partitions."""
    fixed_headers: tuple[tuple[str, str], ...]
    id_prefix: str
    mark: Watermark = dataclasses.field(default_factory=Watermark)
    in_core: int = 0
    """Messages handed to (or being handed to) the dispatcher without an outcome yet."""
    publishing: int = 0
    """Messages whose dead letter or responses are being published."""
    retrying: dict[int, _Record] = dataclasses.field(default_factory=dict)
    """Messages waiting for their redelivery backoff, by offset."""
    paused: bool = False
    revoking: bool = False
    revoked: bool = False

    @property
    def busy(self) -> bool:
        return self.in_core > 0 or self.publishing > 0


@dataclasses.dataclass(eq=False, slots=True)
class _Record:
    """What the source remembers about one fetched message (``Message.handle``)."""

    partition: _Partition
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    message: Message
    deliveries: int = 1
    stuck: bool = False
    held: bool = False
    """Its ordering key is held in the core for its redelivery (``resume=True``)."""
    timer: asyncio.TimerHandle | None = None


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class _KafkaCollector(Collector):
    """Kafka metrics of every Kafka source sharing one registry, read at scrape time."""

    def __init__(self) -> None:
        self.sources: list[KafkaSource] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stuck = GaugeMetricFamily(
            "fastconn_kafka_stuck_messages",
            "Messages being redelivered after failures (not done, holding their partition's commit)",
            labels=["source"],
        )
        pending = GaugeMetricFamily(
            "fastconn_kafka_pending_messages",
            "Messages fetched and not yet below the committed watermark",
            labels=["source", "topic", "partition"],
        )
        committed = GaugeMetricFamily(
            "fastconn_kafka_committed_offset",
            "Last committed offset (next offset to read)",
            labels=["source", "topic", "partition"],
        )
        assigned = GaugeMetricFamily(
            "fastconn_kafka_assigned_partitions", "Partitions assigned", labels=["source"]
        )
        paused = GaugeMetricFamily(
            "fastconn_kafka_paused_partitions",
            "Partitions paused because their pending budget is used up",
            labels=["source"],
        )
        duplicates = CounterMetricFamily(
            "fastconn_kafka_rebalance_duplicates",
            "Messages past the committed offset of revoked partitions "
            "(delivered, in flight or retrying): the next owner reads them "
            "again",
            labels=["source"],
        )
        rebalances = CounterMetricFamily(
            "fastconn_kafka_rebalances", "Partition assignments received", labels=["source"]
        )
        dead = CounterMetricFamily(
            "fastconn_kafka_dead_lettered", "Messages written to the dead-letter topic", labels=["source"]
        )
        redeliveries = CounterMetricFamily(
            "fastconn_kafka_redeliveries",
            "Messages resubmitted after a RETRY or FAILED verdict",
            labels=["source"],
        )
        responses = CounterMetricFamily(
            "fastconn_kafka_responses_published",
            "Function responses published to the response topic",
            labels=["source"],
        )
        commits = CounterMetricFamily(
            "fastconn_kafka_commits", "Successful offset commits", labels=["source"]
        )
        for source in self.sources:
            name = source.name
            stuck.add_metric([name], source.stuck_messages)
            parts = list(source.partitions())
            assigned.add_metric([name], len(parts))
            paused.add_metric([name], sum(1 for p in parts if p.paused))
            for p in parts:
                labels = [name, p.tp.topic, str(p.tp.partition)]
                pending.add_metric(labels, p.mark.outstanding)
                if p.mark.committed is not None:
                    committed.add_metric(labels, p.mark.committed)
            s = source.counters
            duplicates.add_metric([name], s["duplicates"])
            rebalances.add_metric([name], s["rebalances"])
            dead.add_metric([name], s["dead_lettered"])
            redeliveries.add_metric([name], s["redeliveries"])
            responses.add_metric([name], s["responses"])
            commits.add_metric([name], s["commits"])
        yield from (
            stuck,
            pending,
            committed,
            assigned,
            paused,
            duplicates,
            rebalances,
            dead,
            redeliveries,
            responses,
            commits,
        )


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _KafkaCollector] = weakref.WeakKeyDictionary()


def _collector(registry: CollectorRegistry) -> _KafkaCollector:
    collector = _COLLECTORS.get(registry)
    if collector is None:
        collector = _COLLECTORS[registry] = _KafkaCollector()
        registry.register(collector)
    return collector


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


class KafkaSource:
    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._acked: Any = None
        self._failed: Any = None
        self._consumer: Any = None
        self._producer: Any = None
        self._partitions: dict[Any, _Partition] = {}
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        """Set whenever messages settle or publishing finishes (wakes capacity/revoke waits)."""
        self._due: list[_Record] = []
        self._due_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._subscribed = asyncio.Event()
        self._topics: tuple[str, ...] = ()
        self._topic_change: asyncio.Task[None] | None = None
        self._closing = False
        self._subscribing = False
        self._capture = config.response_topic is not None
        self._resume_below = max(1, config.max_pending_per_partition // 2)
        self.stuck_messages = 0
        self.counters = dict.fromkeys(
            ("duplicates", "rebalances", "dead_lettered", "redeliveries", "responses", "commits"), 0
        )

    # -- introspection (metrics, tests) -----------------------------------------------------

    def partitions(self) -> Iterator[_Partition]:
        return iter(list(self._partitions.values()))

    @property
    def consumer(self) -> Any:
        """The aiokafka consumer (None before ``start``)."""
        return self._consumer

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self._acked = ctx.metrics.messages_acked.labels(source=self.name)
        self._failed = ctx.metrics.messages_failed.labels(source=self.name)
        _collector(ctx.metrics.registry).sources.append(self)
        if self._dynamic_topics():
            ctx.on_topics_changed(self._on_topics_changed)

    def _dynamic_topics(self) -> bool:
        ctx = self._require_ctx()
        return not (self.config.topics or self.config.topic_pattern or ctx.default_topics)

    async def start(self) -> None:
        ctx = self._require_ctx()
        options = consumer_options(self.config)
        self._consumer = await self._connect(lambda: AIOKafkaConsumer(**options), "consumer")
        if self.config.dead_letter_topic or self.config.response_topic:
            popts = producer_options(self.config)
            self._producer = await self._connect(lambda: AIOKafkaProducer(**popts), "producer")
        if self._dynamic_topics():
            self._topics = ctx.subscribed_topics
        self._tasks = [
            asyncio.create_task(self._intake(), name=f"kafka-intake-{self.name}"),
            asyncio.create_task(self._redeliver(), name=f"kafka-redeliver-{self.name}"),
            asyncio.create_task(self._commit_periodically(), name=f"kafka-commit-{self.name}"),
        ]
        log.info(
            "kafka source %r connected to %s (group %s, ordering %s)",
            self.name,
            ",".join(self.config.brokers),
            self.config.group_id,
            self.config.ordering,
        )

    async def _connect(self, build: Any, what: str) -> Any:
        """Starts an aiokafka client, retrying until ``startup_timeout``."""
        deadline = time.monotonic() + self.config.startup_timeout
        delay = 0.5
        while True:
            client = build()
            try:
                await client.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await client.stop()
                self._error("connect")
                if time.monotonic() + delay > deadline:
                    raise SourceError(
                        f"kafka source {self.name!r}: cannot connect the {what} to "
                        f"{','.join(self.config.brokers)}: {exc}"
                    ) from None
                log.warning("kafka %s cannot connect yet (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            return client

    async def stop(self) -> None:
        """Stops fetching and redelivering. Messages in the dispatcher keep settling; messages
        waiting for a redelivery stay uncommitted (read again after a restart)."""
        self._stop.set()
        for task in self._tasks[:2]:
            task.cancel()
        for task in self._tasks[:2]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._topic_change is not None:
            self._topic_change.cancel()
        for part in self._partitions.values():
            for rec in part.retrying.values():
                if rec.timer is not None:
                    rec.timer.cancel()
            part.retrying.clear()
        self._due.clear()

    async def close(self) -> None:
        """After the dispatcher drained: finish publishing (bounded), commit, leave the group."""
        if self._publishes:
            _, pending = await asyncio.wait(self._publishes, timeout=max(1.0, self.config.revoke_timeout))
            for task in pending:
                task.cancel()
        for task in self._tasks[2:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._commit()
        self._closing = True
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        for part in self._partitions.values():
            log.info(
                "kafka %s[%d]: closed at committed offset %s (%d past it not done)",
                part.tp.topic,
                part.tp.partition,
                part.mark.committed,
                part.mark.outstanding,
            )

    # -- subscription ----------------------------------------------------------------------

    def _subscribe(self) -> None:
        listener = _Listener(self)
        consumer = self._consumer
        ctx = self._require_ctx()
        if self.config.topic_pattern:
            consumer.subscribe(pattern=self.config.topic_pattern, listener=listener)
            log.info("kafka source %r subscribed to pattern %r", self.name, self.config.topic_pattern)
        else:
            wanted = self.config.topics or ctx.default_topics or self._topics
            topics = tuple(t for t in wanted if _TOPIC.fullmatch(t) and t not in self._outputs())
            if len(topics) != len(wanted):
                log.warning(
                    "kafka source %r does not consume %s (not Kafka topic names, or its own "
                    "dead-letter/response topics)",
                    self.name,
                    sorted(set(wanted) - set(topics)),
                )
            if not topics:
                return
            if set(topics) == set(consumer.subscription() or ()):
                self._subscribed.set()
                return
            consumer.subscribe(topics=list(topics), listener=listener)
            log.info("kafka source %r subscribed to %s", self.name, ", ".join(topics))
        self._subscribed.set()

    def _outputs(self) -> tuple[str, ...]:
        return tuple(t for t in (self.config.dead_letter_topic, self.config.response_topic) if t)

    def _on_topics_changed(self, topics: tuple[str, ...]) -> None:
        self._topics = topics
        if not self._subscribing or self._stop.is_set():
            return  # the intake subscribes to the latest topics once the topic map is ready
        previous = self._topic_change
        self._topic_change = asyncio.create_task(self._change_topics(previous))

    async def _change_topics(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        wanted = tuple(t for t in self._topics if _TOPIC.fullmatch(t) and t not in self._outputs())
        if wanted:
            self._subscribe()  # when they differ, aiokafka rebalances: revoke (commit), then assign
            return
        if self._subscribed.is_set():
            # No function subscribes to anything: hand every partition back.
            self._subscribed.clear()
            await self._revoke(list(self._partitions))
            self._consumer.unsubscribe()
            log.info("kafka source %r unsubscribed (no topics)", self.name)

    # -- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        ctx = self._require_ctx()
        # Messages fetched before the topic map exists would be "unrouted" and committed.
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning("kafka source %r waits for the topic map before fetching", self.name)
        self._subscribing = True
        self._subscribe()
        consumer = self._consumer
        while not self._stop.is_set():
            if not self._subscribed.is_set():
                await self._subscribed.wait()
                continue
            budget = self._fetch_budget()
            if budget <= 0:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 0.1)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=budget)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                self._error("fetch")
                log.warning("kafka fetch failed: %s", exc)
                await wait_or_stop(self._stop, 1.0)
                continue
            messages = self._accept(batches)
            if messages:
                try:
                    await self._submit(messages)
                except DispatcherClosed:
                    return

    def _fetch_budget(self) -> int:
        """How many records the next fetch may take: within one dispatcher chunk, and leaving
        room for redeliveries (which may hold keys other messages wait behind)."""
        d = self._require_ctx().dispatcher
        if not d.has_capacity:
            return 0
        reserve = min(self.stuck_messages, d.capacity // 2)
        free = d.capacity - d.queued - reserve
        return max(0, min(free, self.config.max_poll_records, d.options.batch_size))

    def _accept(self, batches: dict[Any, list[Any]]) -> list[Message]:
        messages: list[Message] = []
        budget = self.config.max_pending_per_partition
        for tp, records in batches.items():
            part = self._partitions.get(tp)
            if part is None:
                # aiokafka returns records of its current assignment only, and may do so an
                # instant before our on_partitions_assigned runs.
                part = self._partition(tp)
            elif part.revoking:
                continue  # being revoked: not ours to start any more
            self._take(part, records, messages)
            if part.mark.outstanding >= budget and not part.paused:
                part.paused = True
                with contextlib.suppress(IllegalStateError):
                    self._consumer.pause(tp)
                log.debug("kafka %s paused (%d pending)", tp, part.mark.outstanding)
        return messages

    def _take(self, part: _Partition, records: list[Any], out: list[Message]) -> None:
        """Turns one partition's records into messages (the per-message hot path)."""
        track = part.mark.track
        topic, fixed, id_prefix, prefix = part.tp.topic, part.fixed_headers, part.id_prefix, part.order_prefix
        by_key = self.config.ordering == "key"
        by_partition = self.config.ordering == "partition"
        taken = 0
        for record in records:
            offset = record.offset
            try:
                track(offset)
            except ValueError:
                log.debug("kafka %s: offset %d already taken", part.tp, offset)
                continue
            key: bytes | None = record.key
            offset_text = str(offset)
            record_headers = record.headers
            headers = _record_headers(record_headers) if record_headers else []
            headers += fixed
            headers.append(("X-Kafka-Offset", offset_text))
            if key is not None:
                _key_headers(headers, key)
            order_key = prefix if by_partition else prefix + key if by_key and key is not None else None
            value = record.value
            message = Message(
                topic,
                value if value is not None else b"",
                headers,
                id_prefix + offset_text,
                order_key,
                hold_key_on_retry=order_key is not None,
                # Without a dead-letter topic a final failure is retried forever: its key waits.
                hold_key_on_failure=order_key is not None and not self.config.dead_letter_topic,
            )
            message.handle = _Record(part, offset, key, record_headers, message)
            out.append(message)
            taken += 1
        part.in_core += taken

    async def _submit(self, messages: list[Message]) -> None:
        try:
            await self._require_ctx().submit(
                self.name,
                messages,
                self._on_outcomes,
                capture=self._capture,
                asynchronous=self.config.asynchronous_invocation,
            )
        except BaseException:
            for m in messages:
                m.handle.partition.in_core -= 1
            self._progress.set()
            raise

    # -- outcomes --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        acked = 0
        publish_ok = self._producer is not None and self.config.response_topic is not None
        dead_letters = self.config.dead_letter_topic is not None
        for outcome in outcomes:
            rec: _Record = outcome.message.handle
            part = rec.partition
            part.in_core -= 1
            if part.revoked or self._closing:
                self._abandon(rec, outcome)
                continue
            verdict = outcome.verdict
            if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
                if publish_ok and outcome.results:
                    self._publish(rec, outcome, dead_letter=False)
                else:
                    self._done(rec)
                    acked += 1
            elif verdict is Verdict.FAILED and dead_letters:
                self._publish(rec, outcome, dead_letter=True)
            else:
                self._retry_later(rec, outcome)
        if acked:
            self._acked.inc(acked)
        self._progress.set()

    def _abandon(self, rec: _Record, outcome: Outcome) -> None:
        """An outcome for a partition no longer ours: only give back a key the core holds."""
        message = outcome.message
        if _holds_key(outcome):
            assert message.key is not None
            self._require_ctx().dispatcher.release_key(message.key)
        self._unstick(rec)

    def _done(self, rec: _Record) -> None:
        """The message is done: its offset may be committed (the caller counts it)."""
        if rec.stuck:
            rec.stuck = False
            self.stuck_messages -= 1
        part = rec.partition
        if part.revoked:
            return
        part.mark.complete(rec.offset)
        if part.paused and not part.revoking and part.mark.outstanding < self._resume_below:
            part.paused = False
            if not self._stop.is_set():
                with contextlib.suppress(IllegalStateError):
                    self._consumer.resume(part.tp)
                log.debug("kafka %s resumed", part.tp)

    def _unstick(self, rec: _Record) -> None:
        if rec.stuck:
            rec.stuck = False
            self.stuck_messages -= 1

    def _retry_later(self, rec: _Record, outcome: Outcome) -> None:
        held = _holds_key(outcome)
        rec.held = held
        if not rec.stuck:
            rec.stuck = True
            self.stuck_messages += 1
        cfg = self.config
        delay = min(cfg.retry_backoff_max, cfg.retry_backoff_initial * 2 ** min(rec.deliveries - 1, 30))
        if outcome.retry_after:
            delay = max(delay, outcome.retry_after)
        failure = outcome.first_failure()
        level = logging.WARNING if rec.deliveries == 1 or rec.deliveries % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "kafka %s not delivered (%s, delivery %d): redelivering in %.1fs%s",
            outcome.message_id,
            f"{failure.function} -> {failure.status_label}" if failure else outcome.verdict.name,
            rec.deliveries,
            delay,
            ""
            if outcome.verdict is Verdict.RETRY
            else " (failed for good, no dead_letter_topic: retried until it succeeds)",
        )
        if self._stop.is_set():
            return  # shutting down: stays uncommitted, read again after the restart
        rec.timer = asyncio.get_running_loop().call_later(delay, self._due_now, rec)
        rec.partition.retrying[rec.offset] = rec

    def _due_now(self, rec: _Record) -> None:
        rec.timer = None
        if rec.partition.retrying.pop(rec.offset, None) is None:
            return
        self._due.append(rec)
        self._due_event.set()

    async def _redeliver(self) -> None:
        """Resubmits messages whose backoff is over, in batches."""
        ctx = self._require_ctx()
        while True:
            await self._due_event.wait()
            self._due_event.clear()
            while self._due:
                d = ctx.dispatcher
                room = max(1, min(d.capacity - d.queued, d.options.batch_size))
                batch, self._due = self._due[:room], self._due[room:]
                messages = []
                for rec in batch:
                    if rec.partition.revoked:
                        self._drop_waiting(rec)
                        continue
                    messages.append(self._next_delivery(rec))
                if not messages:
                    continue
                try:
                    await self._submit(messages)
                except DispatcherClosed:
                    return
                self.counters["redeliveries"] += len(messages)

    def _next_delivery(self, rec: _Record) -> Message:
        rec.deliveries += 1
        # A held key waits for exactly this message: it starts at once (resume). A FAILED one's
        # key was not held, so it queues behind its key like a new message.
        message = dataclasses.replace(rec.message, delivery_attempt=rec.deliveries, resume=rec.held)
        rec.message = message
        rec.held = False
        rec.partition.in_core += 1
        return message

    def _drop_waiting(self, rec: _Record) -> None:
        """A redelivery that will not happen (its partition is gone): give back its held key."""
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None
        if rec.held and rec.message.key is not None:
            self._require_ctx().dispatcher.release_key(rec.message.key)
            rec.held = False
        self._unstick(rec)

    # -- dead letters and responses ----------------------------------------------------------

    def _publish(self, rec: _Record, outcome: Outcome, *, dead_letter: bool) -> None:
        rec.partition.publishing += 1
        task = asyncio.create_task(self._publish_then_done(rec, outcome, dead_letter))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    async def _publish_then_done(self, rec: _Record, outcome: Outcome, dead_letter: bool) -> None:
        part = rec.partition
        try:
            if dead_letter:
                assert self.config.dead_letter_topic is not None
                value = outcome.message.payload
                headers = self._dlt_headers(rec, outcome)
                if not await self._send(
                    rec, self.config.dead_letter_topic, value, headers, what="dead letter"
                ):
                    return
                self.counters["dead_lettered"] += 1
                failure = outcome.first_failure()
                log.warning(
                    "kafka %s dead-lettered to %s (%s)",
                    outcome.message_id,
                    self.config.dead_letter_topic,
                    failure and f"{failure.function} -> {failure.status_label}",
                )
            if self.config.response_topic:
                where = [
                    ("X-Kafka-Topic", part.tp.topic.encode()),
                    ("X-Kafka-Partition", str(part.tp.partition).encode()),
                    ("X-Kafka-Offset", str(rec.offset).encode()),
                ]
                for body, fields in response_messages(outcome):
                    headers = [(k, v.encode()) for k, v in fields.items()] + where
                    if not await self._send(
                        rec, self.config.response_topic, body, headers, what="response", optional=True
                    ):
                        return
            self._done(rec)
            (self._failed if dead_letter else self._acked).inc()
        finally:
            part.publishing -= 1
            self._progress.set()

    async def _send(
        self,
        rec: _Record,
        topic: str,
        value: bytes,
        headers: list[tuple[str, bytes]],
        *,
        what: str,
        optional: bool = False,
    ) -> bool:
        """Publishes until it succeeds (True), or the partition is revoked / the source closes
        (False: the message stays undone and is read again)."""
        delay = self.config.retry_backoff_initial
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=rec.key, headers=headers)
                if what == "response":
                    self.counters["responses"] += 1
                return True
            except MessageSizeTooLargeError as exc:
                self._error("publish")
                if optional:
                    log.error(
                        "kafka: %s for %s too large for %s, not published: %s",
                        what,
                        rec.message.message_id,
                        topic,
                        exc,
                    )
                    return True
                log.error(
                    "kafka: %s for %s too large for %s (%s); retrying in %.1fs",
                    what,
                    rec.message.message_id,
                    topic,
                    exc,
                    delay,
                )
            except KafkaError as exc:
                self._error("publish")
                log.warning(
                    "kafka: publishing the %s of %s to %s failed (%s); retrying in %.1fs",
                    what,
                    rec.message.message_id,
                    topic,
                    exc,
                    delay,
                )
            if rec.partition.revoked or self._closing:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.retry_backoff_max)
            if rec.partition.revoked or self._closing:
                return False

    def _dlt_headers(self, rec: _Record, outcome: Outcome) -> list[tuple[str, bytes]]:
        part = rec.partition
        failed = [r for r in outcome.results if not r.ok]
        first = failed[0] if failed else None
        context = [
            (DLT_TOPIC, part.tp.topic),
            (DLT_PARTITION, str(part.tp.partition)),
            (DLT_OFFSET, str(rec.offset)),
            (DLT_MESSAGE_ID, outcome.message_id),
            (DLT_DELIVERIES, str(rec.deliveries)),
            (DLT_TIME, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            (DLT_FAILED, ",".join(r.function for r in failed)),
        ]
        if first is not None:
            context += [
                (DLT_FUNCTION, first.function),
                (DLT_STATUS, str(first.status)),
                (DLT_ATTEMPTS, str(first.attempts)),
                (DLT_ERROR, _error_text(first)),
            ]
        headers = [(k, v) for k, v in rec.headers if not k.startswith("fastconn-dlt-")]
        headers += [(k, v.encode()) for k, v in context]
        if first is not None and first.body:
            headers.append((DLT_RESPONSE, first.body[:_RESPONSE_EXCERPT]))
        return headers

    # -- commits ---------------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval)
            await self._commit()

    async def _commit(self, parts: Sequence[_Partition] | None = None) -> bool:
        """Commits the watermarks that moved. Returns False when the commit failed."""
        if self._consumer is None or self._closing:
            return True
        chosen = list(self._partitions.values()) if parts is None else list(parts)
        offsets = {p.tp: pos for p in chosen if not p.revoked and (pos := p.mark.to_commit()) is not None}
        if not offsets:
            return True
        async with self._commit_lock:
            try:
                await self._consumer.commit(offsets)
            except (KafkaError, IllegalStateError) as exc:
                self._error("commit")
                log.warning("kafka commit of %s failed: %s", _describe(offsets), exc)
                return False
        for p in chosen:
            if p.tp in offsets:
                p.mark.mark_committed(offsets[p.tp])
        self.counters["commits"] += 1
        log.debug("kafka committed %s", _describe(offsets))
        return True

    # -- rebalances ------------------------------------------------------------------------

    async def _revoke(self, tps: Sequence[Any]) -> None:
        """Stop fetching ``tps``, let their in-flight calls finish (bounded), commit, release."""
        parts = [p for tp in tps if (p := self._partitions.get(tp)) is not None]
        if not parts:
            return
        started = time.monotonic()
        deadline = started + self.config.revoke_timeout
        for p in parts:
            p.revoking = True
        if not self._closing:
            await self._flush_retries(parts, deadline)
            while any(p.busy for p in parts) and time.monotonic() < deadline:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), max(0.0, deadline - time.monotonic()))
            await self._commit(parts)
        duplicates = sum(p.mark.outstanding for p in parts)
        for p in parts:
            self._forget(p)
        self.counters["duplicates"] += duplicates
        unfinished = sum(p.mark.in_flight for p in parts)
        log.info(
            "kafka source %r released %d partition(s) in %.2fs (%d message(s) past the commit will be "
            "read again, %d unfinished)",
            self.name,
            len(parts),
            time.monotonic() - started,
            duplicates,
            unfinished,
        )

    async def _flush_retries(self, parts: Sequence[_Partition], deadline: float) -> None:
        """Messages waiting for a redelivery while their key is held: redeliver them now, so
        the messages queued behind their key in the core follow them in order (rather than
        being let go first by a bare key release)."""
        flush: list[_Record] = []
        for p in parts:
            for rec in list(p.retrying.values()):
                if rec.timer is not None:
                    rec.timer.cancel()
                    rec.timer = None
                if rec.held:
                    flush.append(rec)
                else:
                    self._unstick(rec)
            p.retrying.clear()
        if not flush:
            return
        messages = [self._next_delivery(rec) for rec in flush]
        try:
            await asyncio.wait_for(self._submit(messages), max(0.01, deadline - time.monotonic()))
        except (TimeoutError, DispatcherClosed):
            for m in messages:
                if m.key is not None:
                    self._require_ctx().dispatcher.release_key(m.key)
                self._unstick(m.handle)

    def _forget(self, part: _Partition) -> None:
        """The partition is no longer ours: late outcomes for it are ignored."""
        part.revoked = True
        for rec in part.retrying.values():
            self._drop_waiting(rec)
        part.retrying.clear()
        if self._partitions.get(part.tp) is part:
            del self._partitions[part.tp]

    def _partition(self, tp: Any) -> _Partition:
        part = self._partitions.get(tp)
        if part is None:
            prefix = f"{tp.topic}\x00{tp.partition}\x00".encode()
            fixed = (("X-Kafka-Topic", tp.topic), ("X-Kafka-Partition", str(tp.partition)))
            part = self._partitions[tp] = _Partition(tp, prefix, fixed, f"{tp.topic}/{tp.partition}/")
        return part

    def _assigned(self, tps: Sequence[Any]) -> None:
        self.counters["rebalances"] += 1
        for part in list(self._partitions.values()):
            if part.tp not in tps:  # lost without a revoke (aiokafka always revokes first)
                self.counters["duplicates"] += part.mark.outstanding
                self._forget(part)
        for tp in tps:
            self._partition(tp)
        log.info("kafka source %r assigned %s", self.name, _describe({tp: None for tp in tps}) or "nothing")

    # -- helpers ---------------------------------------------------------------------------

    def _error(self, kind: str) -> None:
        if self._ctx is not None:
            self._ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError("kafka source used before register()")
        return self._ctx


def _describe(offsets: dict[Any, Any]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{pos}" if pos is not None else "")
        for tp, pos in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition))
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka calls these from its group coordination task, around every rebalance."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self._source._revoke(list(revoked))
        except Exception:
            log.exception("kafka: handling revoked partitions failed")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            self._source._assigned(list(assigned))
        except Exception:
            log.exception("kafka: handling assigned partitions failed")


def _holds_key(outcome: Outcome) -> bool:
    """Whether the core kept the message's ordering key busy for its redelivery."""
    m = outcome.message
    if m.key is None:
        return False
    return (outcome.verdict is Verdict.RETRY and m.hold_key_on_retry) or (
        outcome.verdict is Verdict.FAILED and m.hold_key_on_failure
    )
