"""``[[sources]] type = "vcenter"``: the configuration model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fastconn.checkpoint import CheckpointConfig
from fastconn.dead_letter_sink import DeadLetterConfig
from fastconn.durations import Duration
from fastconn.secret_files import read_secret

__all__ = ["Endpoint", "VcenterConfig"]

_EVENT_TYPE = r"^[A-Za-z][A-Za-z0-9_.-]*$"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where pyvmomi connects: ``SmartConnect(protocol, host, port, path)``."""

    protocol: str
    host: str
    port: int
    path: str


class VcenterConfig(BaseModel):
    """``[[sources]] type = "vcenter"``: vSphere events read with an event history collector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["vcenter"] = "vcenter"
    name: str = Field(default="vcenter", min_length=1)
    url: str
    """The SDK endpoint: ``https://vcenter.example.com/sdk`` (``http://`` for a simulator)."""
    username: str | None = None
    username_file: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: str | None = None
    insecure: bool = False
    """Skip the certificate check of an ``https`` URL (a lab vCenter with a self-signed one)."""
    tls_ca: str | None = None
    """PEM file of the CA that signed vCenter's certificate (default: the system's CAs)."""
    topic_style: Literal["dotted", "class"] = "dotted"
    """``dotted``: ``vm.powered.on`` (the vcenter-connector's topics); ``class``:
    ``VmPoweredOnEvent`` (the VMware Event Broker's)."""
    event_types: tuple[str, ...] = ()
    """Only these event classes (``VmPoweredOnEvent``) or ``eventTypeId``s (``EventEx``
    events); empty: every event. Filtered by vCenter itself."""
    begin: Literal["checkpoint", "now"] = "checkpoint"
    """``checkpoint``: resume after the saved checkpoint (the newest event when there is none
    yet); ``now``: ignore the checkpoint and start at the newest event."""
    page_size: int = Field(default=100, ge=1, le=1000)
    """Events per collector page: the most read per poll, and the window within which a burst
    between two polls is seen without a catch-up read."""
    poll_interval: Duration = Field(default=1.0, gt=0, le=300)
    retry_initial: Duration = Field(default=1.0, gt=0)
    """First wait before re-sending an event whose functions failed (doubling per attempt), and
    before reconnecting to vCenter."""
    retry_max: Duration = Field(default=60.0, gt=0)
    max_pending: int = Field(default=10_000, ge=1)
    """Events read and not settled yet; reading pauses above it (one stuck event holds the
    checkpoint and everything read after it)."""
    timeout: Duration = Field(default=30.0, gt=0)
    """Seconds one vCenter call may take before the connection counts as lost."""
    checkpoint: CheckpointConfig | None = None
    """Where the last settled event key is kept (default: a local file)."""
    dead_letter: DeadLetterConfig | None = None
    """Where events whose functions failed for good go; without one they are retried."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; the checkpoint waits for the callbacks."""
    cloudevents: bool = False
    """Also send CloudEvents binary-mode ``ce-*`` headers (the Event Broker's event shape)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http(s)://<vcenter host>[:port]/sdk, e.g. https://vcenter/sdk")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username/password (or their _file keys), not in the URL")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"url has a bad port: {exc}") from None
        return value

    @field_validator("event_types")
    @classmethod
    def _check_event_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import re

        bad = [t for t in value if not re.match(_EVENT_TYPE, t)]
        if bad:
            raise ValueError(f"event_types {bad!r} are not event class names (e.g. VmPoweredOnEvent)")
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> VcenterConfig:
        for key in ("username", "password"):
            given = [k for k in (key, f"{key}_file") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"set either {key} or {key}_file, not both")
            if not given:
                raise ValueError(f"{key} (or {key}_file) is required: vCenter needs a login")
        if self.insecure and self.tls_ca is not None:
            raise ValueError("insecure = true skips the certificate check that tls_ca is for: set one")
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must be at least retry_initial")
        return self

    @property
    def endpoint(self) -> Endpoint:
        parts = urlsplit(self.url)
        default_port = 443 if parts.scheme == "https" else 80
        return Endpoint(parts.scheme, parts.hostname or "", parts.port or default_port, parts.path or "/sdk")

    @property
    def host(self) -> str:
        """``X-Vcenter-Host``: the host part of ``url``."""
        return urlsplit(self.url).hostname or ""

    def credentials(self) -> tuple[str, str]:
        """``(username, password)`` with the ``_file`` variants read; raises SourceError."""
        owner = f"source {self.name}"
        username = self.username or read_secret(str(self.username_file), "username", owner)
        password = self.password or read_secret(str(self.password_file), "password", owner)
        return username, password
