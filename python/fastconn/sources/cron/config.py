"""``[[sources]] type = "cron"``: the configuration model and the per-function policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fastconn.durations import Duration, parse_duration
from fastconn.sources._nats_common import NatsConnectionConfig
from fastconn.sources.cron.schedule import DEFAULT_TIMEZONE, zone
from fastconn.sources.cron.timeline import CatchUp

__all__ = ["CronConfig", "JetStreamKVStoreConfig", "Policy"]


class JetStreamKVStoreConfig(NatsConnectionConfig):
    """``store = { type = "jetstream_kv", ... }``: replicas agree on slots through this bucket."""

    type: Literal["jetstream_kv"]
    bucket: str = Field(default="fastconn_cron", pattern=r"^[A-Za-z0-9_-]+$")
    """The key-value bucket (one key per scheduled function)."""
    create_bucket: bool = True
    """Create the bucket (history 1) when it does not exist."""
    lease: Duration = Field(default=30.0, ge=1.0)
    """How long a claimed slot stays this replica's without renewal (renewed every third of it
    while the call runs). A claim whose lease expired without being marked done is taken over
    and fired by another replica or the restarted daemon: the longest a crash delays a slot."""


class CronConfig(BaseModel):
    """``[[sources]] type = "cron"``: fires functions on their ``schedule``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["cron"] = "cron"
    name: str = Field(default="cron", min_length=1)
    timezone: str = DEFAULT_TIMEZONE
    """IANA zone of schedules without a ``timezone`` annotation or key of their own."""
    body: str = ""
    """Request body of every fire (OpenFaaS sends an empty one)."""
    concurrency: Literal["allow", "forbid"] = "allow"
    """``forbid``: skip a fire while this replica's previous fire of the function still runs."""
    catch_up: CatchUp = "none"
    """Slots missed while fastconn was down: ``none``, the ``last`` one, or ``all`` (newest
    ``max_catch_up``). Needs a ``store``: it remembers the last fired slot."""
    max_catch_up: int = Field(default=10, ge=1)
    jitter: Duration = Field(default=0.0, ge=0)
    """Each fire starts up to this many seconds after its slot, at random (spreads load)."""
    asynchronous_invocation: bool = False
    store: JetStreamKVStoreConfig | None = None
    """Shared by replicas: one fire per slot among them. Without it one replica is assumed."""

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        zone(value)
        return value

    @property
    def policy(self) -> Policy:
        return Policy(self.concurrency, self.catch_up, self.max_catch_up, self.jitter)


@dataclass(frozen=True, slots=True)
class Policy:
    concurrency: Literal["allow", "forbid"] = "allow"
    catch_up: CatchUp = "none"
    max_catch_up: int = 10
    jitter: float = 0.0

    def overridden(self, annotations: Mapping[str, str], report: Callable[[str, str, str], None]) -> Policy:
        """This policy with ``fastconn.cron.<key>`` annotation values applied; a bad value is
        passed to ``report(key, value, reason)`` and leaves the default."""
        policy = self
        for key, value in annotations.items():
            text = value.strip().lower()
            if key == "concurrency" and text in ("allow", "forbid"):
                policy = replace(policy, concurrency=text)  # type: ignore[arg-type]
            elif key == "catch_up" and text in ("none", "last", "all"):
                policy = replace(policy, catch_up=text)  # type: ignore[arg-type]
            elif key == "max_catch_up" and text.isdigit() and int(text) >= 1:
                policy = replace(policy, max_catch_up=int(text))
            elif key == "jitter" and (jitter := _duration(text)) is not None:
                policy = replace(policy, jitter=jitter)
            else:
                report(key, value, _EXPECTED.get(key, f"unknown key; known: {', '.join(_EXPECTED)}"))
        return policy


_EXPECTED: Final = {
    "concurrency": "expected allow or forbid",
    "catch_up": "expected none, last or all",
    "max_catch_up": "expected a positive integer",
    "jitter": "expected a duration such as 5s",
}


def _duration(text: str) -> float | None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
