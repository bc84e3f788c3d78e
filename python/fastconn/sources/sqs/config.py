"""``[[sources]] type = "sqs"``: the configuration model."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from fastconn.durations import Duration

__all__ = ["MAX_VISIBILITY", "SqsConfig", "queue_name"]

MAX_VISIBILITY: Final = 43_200.0
"""SQS's ceiling on a message's visibility timeout (12 h), also for the total since receipt."""
_QUEUE_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,80}(\.fifo)?")
_ATTRIBUTE: Final = re.compile(r"[A-Za-z0-9_.\-*]{1,256}")
_QUEUE_ENV: Final = "queue_url"


def queue_name(url: str) -> str:
    """The queue's name: the last path segment of its URL (the topic of its messages)."""
    return urlsplit(url).path.rstrip("/").rpartition("/")[2]


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"{url!r}: expected a queue URL such as https://sqs.<region>.amazonaws.com/<account>/<name>"
        )
    name = queue_name(url)
    if not _QUEUE_NAME.fullmatch(name):
        raise ValueError(
            f"{url!r}: the URL must end with the queue name (1-80 letters, digits, '-' or '_', "
            f"optionally '.fifo'), got {name!r}"
        )
    return url


def _url_list(value: object) -> object:
    """One URL, the OpenFaaS ``--queue-url`` comma form, or a list."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return tuple(_check_url(item) if isinstance(item, str) else item for item in value)
    return value


class SqsConfig(BaseModel):
    """``[[sources]] type = "sqs"``: long-polling consumers on SQS queues, deleting a message
    after every target function succeeded (at-least-once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sqs"] = "sqs"
    name: str = Field(default="sqs", min_length=1)
    queue_urls: Annotated[tuple[str, ...], BeforeValidator(_url_list)] = ()
    """Queue URLs (a list, or one string with commas as OpenFaaS' ``--queue-url``); default:
    env ``queue_url``. The topic of a message is its queue's name."""
    region: str = ""
    """Default: env ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``), else the region in the queue URL."""
    endpoint_url: str | None = None
    """For SQS-compatible servers (ElasticMQ, LocalStack, moto); default: AWS's endpoint."""
    wait_time: Duration = Field(default=20.0, ge=0, le=20)
    """Long-poll wait of a receive (0-20 s)."""
    max_messages: int = Field(default=10, ge=1, le=10)
    """Messages asked for per receive (1-10)."""
    pollers: int | None = Field(default=None, ge=1, le=256)
    """Concurrent receives per queue; default: sized to the dispatcher's capacity (1 for a FIFO
    queue: its receives then return its groups in order whatever the server)."""
    visibility_timeout: Duration = Field(default=30.0, ge=1, le=MAX_VISIBILITY)
    """How long a received message stays hidden; calls running longer get it extended."""
    message_attribute_names: tuple[str, ...] = ("All",)
    """Message attributes to receive (``All``, names, or ``prefix.*``); passed to functions as
    ``X-Sqs-Attr-<name>``."""
    decode: Literal["none", "s3"] = "none"
    """``s3``: each message is an S3/MinIO bucket notification; each record is delivered on its
    own (see :mod:`fastconn.s3_events`) and the message deleted once all of them are settled."""
    max_deliver: int = Field(default=5, ge=1, le=1000)
    """With ``dead_letter_queue_url``: receives (``ApproximateReceiveCount``) before a failing
    message moves there. Without it, the queue's own redrive policy decides."""
    retry_delay: Duration = Field(default=1.0, gt=0)
    """Visibility delay before the first retry of a failed message; doubles per receive."""
    backoff_max: Duration = Field(default=300.0, gt=0, le=MAX_VISIBILITY)
    dead_letter_queue_url: str | None = None
    """Where messages that failed for good are sent (with the failure context as message
    attributes) before they are deleted. Unset: they are made visible again at once, for the
    queue's redrive policy to move them after its ``maxReceiveCount``."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; a message is deleted only after its
    callbacks, its visibility extended while they are awaited."""
    startup_timeout: Duration = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if not data.get("queue_urls") and os.environ.get(_QUEUE_ENV, "").strip():
            data = {**data, "queue_urls": os.environ[_QUEUE_ENV]}
        if not data.get("region"):
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or ""
            if region.strip():
                data = {**data, "region": region.strip()}
        return data

    @model_validator(mode="after")
    def _check(self) -> SqsConfig:
        if not self.queue_urls:
            raise ValueError("queue_urls: required, a list of SQS queue URLs (or env queue_url)")
        if len(set(self.queue_urls)) != len(self.queue_urls):
            raise ValueError(f"queue_urls: a queue is listed twice in {list(self.queue_urls)}")
        names = [queue_name(url) for url in self.queue_urls]
        if len(set(names)) != len(names):
            raise ValueError(f"queue_urls: two queues share a name (the topic) in {names}")
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"endpoint_url: {self.endpoint_url!r} is not an http(s) URL")
        if self.dead_letter_queue_url is not None:
            _check_url(self.dead_letter_queue_url)
            if self.dead_letter_queue_url in self.queue_urls:
                raise ValueError("dead_letter_queue_url: must not be one of queue_urls")
            fifo_dlq = queue_name(self.dead_letter_queue_url).endswith(".fifo")
            if any(name.endswith(".fifo") != fifo_dlq for name in names):
                raise ValueError(
                    "dead_letter_queue_url: a FIFO queue needs a FIFO dead-letter queue and a standard "
                    "queue a standard one; split the queues into two sources"
                )
        if not self.region and not any(_region_in(url) for url in self.queue_urls):
            raise ValueError('region: required (or env AWS_DEFAULT_REGION), e.g. region = "eu-west-1"')
        for name in self.message_attribute_names:
            if not _ATTRIBUTE.fullmatch(name):
                raise ValueError(
                    f"message_attribute_names: {name!r} is not an attribute name, 'All' or 'prefix.*'"
                )
        if self.backoff_max < self.retry_delay:
            raise ValueError(f"backoff_max must be >= retry_delay ({self.retry_delay:g}s)")
        return self

    @property
    def client_region(self) -> str:
        return self.region or next(filter(None, map(_region_in, self.queue_urls)))


def _region_in(url: str) -> str:
    """The region of an AWS queue URL (``sqs.<region>.amazonaws.com``), else ''."""
    host = urlsplit(url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and "amazonaws" in parts:
        return parts[1]
    return ""
