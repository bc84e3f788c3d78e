"""``[[sources]] type = "jetstream"``: the configuration model."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, field_validator, model_validator

from fastconn.durations import Duration
from fastconn.sources._nats_common import NatsSourceOptions, check_subject, check_subjects, subject_covers

__all__ = ["JetStreamConfig"]

_NAME_FORBIDDEN: Final = frozenset(" \t\r\n.*>/\\")


def _check_name(value: str) -> str:
    if not value or any(c in _NAME_FORBIDDEN for c in value):
        raise ValueError("expected a name without whitespace, '.', '*', '>', '/' or '\\'")
    return value


class JetStreamConfig(NatsSourceOptions):
    """``[[sources]] type = "jetstream"``: a durable pull consumer (at-least-once)."""

    type: Literal["jetstream"] = "jetstream"
    name: str = Field(default="jetstream", min_length=1)
    stream: str
    create_stream: bool = False
    """Create ``stream`` (capturing ``subjects``) when it does not exist."""
    subjects: tuple[str, ...] = ()
    """The consumer's filter (empty: the whole stream); the stream's subjects when created."""
    durable: str = "fastconn"
    deliver_policy: Literal["all", "new", "last"] = "all"
    """Where a new durable starts; an existing durable keeps its position."""
    ack_wait: Duration = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, ge=-1)
    """Deliveries before a message fails for good (dead-lettered, or kept and reported without
    a dead-letter subject); -1: unlimited. Counted by fastconn: the consumer itself has no
    limit, so the server never drops a message."""
    max_ack_pending: int = Field(default=1000, ge=1)
    """Unacknowledged messages of the durable (all replicas together)."""
    dead_letter_subject: str | None = None
    nak_delay: Duration = 1.0
    """Redelivery delay after the first failed delivery; doubles per delivery."""
    nak_delay_max: Duration = 60.0
    fetch_batch: int | None = Field(default=None, ge=1)
    """Most messages per pull request; default ``dispatch.batch_size``."""
    ordering: Literal["none", "key"] = "none"
    ordering_key: str = "subject"
    """With ``ordering = "key"``: ``subject``, or the name of a header holding the key."""
    stored_events: bool = False
    """The stream holds events a webhook with a ``store`` accepted (durable ingress): route
    each by the topic it was posted to, with the ``X-Message-Id`` its 202 carried."""
    strict_order_on_restart: bool = True
    """With ``ordering = "key"``: when the durable has unacknowledged messages at start (a
    crash left them), new messages wait until those come back (at most ``ack_wait``), so no
    key runs ahead of an older message of its own. ``false``: start at once and accept that
    such a message may run after newer ones of its key."""

    @field_validator("stream", "durable")
    @classmethod
    def _check_names(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("subjects")
    @classmethod
    def _check_subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_subjects(value)

    @field_validator("dead_letter_subject")
    @classmethod
    def _check_dead_letter(cls, value: str | None) -> str | None:
        if value is not None:
            problem = check_subject(value, wildcards=False)
            if problem:
                raise ValueError(f"subject {value!r} {problem}")
        return value

    @field_validator("max_deliver")
    @classmethod
    def _check_max_deliver(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 for unlimited")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> JetStreamConfig:
        if self.nak_delay_max < self.nak_delay:
            raise ValueError(f"nak_delay_max must be >= nak_delay ({self.nak_delay:g}s)")
        dead = self.dead_letter_subject
        if dead is not None and any(subject_covers(s, dead) for s in self.subjects):
            raise ValueError(
                f"dead_letter_subject {dead!r} is consumed by this source's own subjects: "
                "dead letters would come back"
            )
        if (
            self.ordering_key != "subject"
            and not self.ordering_key.replace("-", "").replace("_", "").isalnum()
        ):
            raise ValueError("ordering_key must be 'subject' or a header name")
        if self.stored_events and self.decode != "none":
            raise ValueError(
                "decode = 's3' with stored_events: a webhook store holds requests its route already "
                "decoded (set decode = 's3' on the webhook instead)"
            )
        return self

    @property
    def strict_restart(self) -> bool:
        """Whether a start after a crash holds new messages for the unacknowledged ones."""
        return self.ordering == "key" and self.strict_order_on_restart
