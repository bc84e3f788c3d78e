"""How to reach Kafka brokers (a private helper module, not a source type): the connection keys
shared by the Kafka source and the durable-ingress store (``store = { type = "kafka" }``), so
both take the same ``brokers``, ``security_protocol``, SASL and TLS keys with the same checks.
Kept outside the ``kafka`` package so configurations that only validate it load no client."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = ["KafkaConnectionConfig", "is_topic_name", "split_list"]

_BROKER = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_NonEmpty = Annotated[str, Field(min_length=1)]


def split_list(value: object) -> object:
    """``"a:9092, b:9092"`` (the OpenFaaS env form) is accepted as well as a list."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def is_topic_name(name: str) -> bool:
    """Whether ``name`` can be a Kafka topic (topic maps may name NATS subjects and such)."""
    return _TOPIC.fullmatch(name) is not None


class KafkaConnectionConfig(BaseModel):
    """How to reach the brokers: shared by the Kafka source and the durable-ingress store
    (``store = { type = "kafka", ... }``), so both take the same keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    brokers: Annotated[tuple[_NonEmpty, ...], BeforeValidator(split_list)] = Field(
        default=(), validate_default=True
    )
    """Bootstrap ``host:port`` list; default from env ``broker_hosts`` (comma list) or
    ``broker_host`` (the OpenFaaS connectors' variables)."""
    client_id: _NonEmpty = "fastconn"
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
    def _sasl_credentials(self) -> KafkaConnectionConfig:
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
