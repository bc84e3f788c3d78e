"""``[[sources]] type = "pushbullet"``: the configuration model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from fastconn.checkpoint import CheckpointConfig
from fastconn.dead_letter_sink import DeadLetterConfig
from fastconn.durations import Duration
from fastconn.errors import SourceError

__all__ = ["PushbulletConfig", "read_token"]

_TAG = r"^[A-Za-z0-9_.~-]{1,128}$"


def _split_list(value: object) -> object:
    """``"alerts, deploys"`` (the env form) as well as a list."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


_PositiveDuration = Annotated[Duration, Field(gt=0)]


class PushbulletConfig(BaseModel):
    """``[[sources]] type = "pushbullet"``: channel pushes (and ephemerals) to functions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["pushbullet"] = "pushbullet"
    name: Annotated[str, Field(min_length=1)] = "pushbullet"
    access_token: str | None = None
    access_token_file: str | None = None
    """A file holding the token (a mounted secret)."""
    api_url: Annotated[str, Field(pattern=r"^https?://")] = "https://api.pushbullet.com"
    """The REST API's base (``/v2/...`` is appended)."""
    stream_url: Annotated[str, Field(pattern=r"^wss?://")] = "wss://stream.pushbullet.com/websocket"
    """The realtime stream (``/<access token>`` is appended)."""
    channels: Annotated[tuple[Annotated[str, Field(pattern=_TAG)], ...], BeforeValidator(_split_list)] = ()
    """Only pushes of these channel tags; empty: every channel subscribed to or owned."""
    ephemerals: bool = True
    """Dispatch the stream's ephemeral ``push`` frames to topic ``ephemeral:<type>``."""
    checkpoint: CheckpointConfig | None = None
    """Where the ``modified_after`` resume point is kept (default: a local file)."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; the checkpoint waits for the callbacks."""
    dead_letter: DeadLetterConfig | None = None
    """Where pushes that failed for good go; unset: they are retried (and the checkpoint waits)."""
    page_size: Annotated[int, Field(ge=1, le=500)] = 500
    """``limit`` of each ``/v2/pushes`` page (the API's maximum is 500)."""
    keepalive_timeout: _PositiveDuration = 90.0
    """The stream sends a ``nop`` about every 30 s: silence this long means a dead connection."""
    reconnect_initial: _PositiveDuration = 1.0
    reconnect_max: _PositiveDuration = 60.0
    retry_backoff_initial: _PositiveDuration = 1.0
    retry_backoff_max: _PositiveDuration = 60.0
    request_timeout: _PositiveDuration = 30.0
    max_rate_limit_wait: _PositiveDuration = 3600.0
    """Longest wait honoured for an ``X-Ratelimit-Reset`` (a clock gone wrong must not stall forever)."""

    @model_validator(mode="after")
    def _check(self) -> PushbulletConfig:
        if (self.access_token is None) == (self.access_token_file is None):
            raise ValueError("set access_token or access_token_file (one of them)")
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max must be >= reconnect_initial")
        if self.retry_backoff_max < self.retry_backoff_initial:
            raise ValueError("retry_backoff_max must be >= retry_backoff_initial")
        return self


def read_token(config: PushbulletConfig) -> str:
    """The access token from ``access_token`` or ``access_token_file``."""
    if config.access_token is not None:
        token = config.access_token.strip()
    else:
        assert config.access_token_file is not None
        try:
            token = Path(config.access_token_file).read_text().strip()
        except OSError as exc:
            raise SourceError(
                f"pushbullet source {config.name!r}: cannot read access_token_file "
                f"{config.access_token_file}: {exc.strerror}"
            ) from None
    if not token or any(c.isspace() or c == "/" for c in token):
        raise SourceError(
            f"pushbullet source {config.name!r}: the access token is empty or malformed "
            "(set access_token / access_token_file to the token from Pushbullet's Account Settings)"
        )
    return token
