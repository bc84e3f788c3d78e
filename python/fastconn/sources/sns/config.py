"""``[[sources]] type = "sns"``: the configuration model and its checks."""

from __future__ import annotations

import re
import ssl
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fastconn.sources.sns.hosts import HostPattern, parse_host_pattern

__all__ = ["DEFAULT_SIGNING_CERT_HOSTS", "SnsConfig", "SubscribeConfig", "topic_arn_region"]

DEFAULT_SIGNING_CERT_HOSTS: Final = (
    # Every commercial and GovCloud region (sns.us-gov-west-1.amazonaws.com), then China.
    "sns.*.amazonaws.com",
    "sns.*.amazonaws.com.cn",
)
"""The hosts AWS serves SNS signing certificates and confirmation links from. ``*`` is exactly
one DNS label (the region), never a dot: ``sns.evil.com.amazonaws.com`` does not match."""

# arn:<partition>:sns:<region>:<account>:<topic name>
_TOPIC_ARN: Final = re.compile(r"arn:[a-z0-9-]+:sns:([a-z0-9-]+):\d{12}:[A-Za-z0-9_.-]{1,256}")


def topic_arn_region(arn: str) -> str:
    """The region part of a topic ARN (the ARN was validated by the config)."""
    return arn.split(":")[3]


def _check_topic_arn(arn: str) -> str:
    if not _TOPIC_ARN.fullmatch(arn):
        raise ValueError(
            f"{arn!r} is not an SNS topic ARN: expected "
            "arn:<partition>:sns:<region>:<12-digit account>:<topic>"
        )
    return arn


class SubscribeConfig(BaseModel):
    """``subscribe = {topic_arn, endpoint}``: call SNS ``Subscribe`` for this endpoint at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic_arn: str
    endpoint: str
    """The public URL SNS posts to (the ingress in front of this daemon), ``http`` or ``https``."""
    region: str | None = None
    """Defaults to the topic ARN's region."""
    endpoint_url: str | None = None
    """The SNS API endpoint (an SNS-compatible server, tests); default: AWS's for the region."""
    raw_message_delivery: bool = False
    """Subscribe with ``RawMessageDelivery``: needs ``raw_delivery_token`` (it is appended to the
    endpoint as ``?token=``, the only way such deliveries can be authenticated)."""

    @field_validator("topic_arn")
    @classmethod
    def _arn(cls, arn: str) -> str:
        return _check_topic_arn(arn)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL: give the public URL SNS should post to")
        return url

    @property
    def protocol(self) -> str:
        return urlsplit(self.endpoint).scheme


class SnsConfig(BaseModel):
    """``[[sources]] type = "sns"``: an HTTP(S) subscription endpoint for SNS topics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sns"] = "sns"
    name: str = "sns"
    decode: Literal["none", "s3"] = "none"
    """``s3``: the published message is an S3 event notification (a bucket notifying this topic):
    each record becomes a message of its own (see :mod:`fastconn.s3_events`), and SNS gets its
    200 once all of them are accepted."""
    path: str = "/sns"
    """Where SNS posts, on the ingress server (``[server] listen``, where webhooks are served)."""
    topic_arns: tuple[str, ...] = ()
    """The topics accepted (exact ARNs); required unless ``subscribe`` names the one topic."""
    signing_cert_hosts: tuple[str, ...] = DEFAULT_SIGNING_CERT_HOSTS
    """Host patterns a ``SigningCertURL`` and a ``SubscribeURL`` must be on (``*`` = one label,
    ``host:port`` pins a port; without one only the default HTTPS port is allowed)."""
    auto_confirm: bool = True
    """Confirm subscriptions of allowed topics by fetching their ``SubscribeURL``."""
    subscribe: SubscribeConfig | None = None
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    cert_ca_file: str | None = None
    """CA bundle (instead of the system's) for fetching certificates and confirmation links."""
    cert_cache_size: int = Field(default=64, ge=1)
    """Signing certificates kept (AWS uses one per region at a time, rotating rarely)."""
    fetch_timeout: float = Field(default=5.0, gt=0, le=12)
    """For one certificate or confirmation fetch; below SNS's own ~15 s delivery timeout."""
    accept_timeout: float = Field(default=5.0, gt=0, le=12)
    """How long a delivery may wait for dispatcher room before it is answered 503."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; SNS still gets its 200 on acceptance, a
    failed callback is re-invoked like a failed call."""
    raw_delivery_token: str | None = None
    """Accept raw deliveries (``x-amz-sns-rawdelivery: true``, which carry no signature) only
    with this token, as ``?token=`` in the endpoint URL or the password of its basic auth."""

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/") or any(c in path for c in "?#{} \t"):
            raise ValueError(f"{path!r} is not a plain URL path: use something like '/sns'")
        if path in ("/healthz", "/readyz", "/metrics") or path.startswith(("/webhook/", "/callback/")):
            raise ValueError(f"{path!r} is served by the daemon itself: choose another path, e.g. '/sns'")
        return path

    @field_validator("topic_arns")
    @classmethod
    def _arns(cls, arns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_topic_arn(arn) for arn in arns)

    @field_validator("signing_cert_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        if not hosts:
            raise ValueError("give at least one host pattern (the default lists AWS's SNS hosts)")
        for host in hosts:
            parse_host_pattern(host)
        return hosts

    @field_validator("cert_ca_file")
    @classmethod
    def _ca_file(cls, path: str | None) -> str | None:
        # Loaded now as at start, so `check` reports a missing or unreadable bundle by its key.
        if path is not None:
            try:
                ssl.create_default_context(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the CA bundle {path!r}: {exc}") from None
        return path

    @field_validator("raw_delivery_token")
    @classmethod
    def _token(cls, token: str | None) -> str | None:
        if token is not None and len(token) < 16:
            raise ValueError("use a random token of at least 16 characters (it is the only authentication)")
        return token

    @model_validator(mode="after")
    def _consistent(self) -> SnsConfig:
        subscribe = self.subscribe
        if subscribe is not None:
            if not self.topic_arns:
                object.__setattr__(self, "topic_arns", (subscribe.topic_arn,))
            elif subscribe.topic_arn not in self.topic_arns:
                raise ValueError(
                    f"subscribe.topic_arn {subscribe.topic_arn!r} is not in topic_arns: add it, or "
                    "its messages would be refused"
                )
            if subscribe.raw_message_delivery and self.raw_delivery_token is None:
                raise ValueError(
                    "subscribe.raw_message_delivery needs raw_delivery_token: raw deliveries carry "
                    "no signature, the token is what authenticates them"
                )
        if not self.topic_arns:
            raise ValueError(
                "topic_arns is empty: list the SNS topic ARNs to accept (messages of any other "
                "topic are refused)"
            )
        return self

    def host_patterns(self) -> tuple[HostPattern, ...]:
        return tuple(parse_host_pattern(host) for host in self.signing_cert_hosts)
