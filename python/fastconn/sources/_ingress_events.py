"""What the sources served by the ingress server's event routes (``webhook``, ``cloudevents``)
share: the state every one of them keeps, telling the core's route whether it accepts and whether
its requests need Python, and counting what the core accepted and settled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

from fastconn.ingress import warn_undelivered
from fastconn.message import Message, Outcome
from fastconn.ratelimit import RateLimitedLog
from fastconn.source import SourceContext


class EventRouteConfig(Protocol):
    """The keys of an event route's configuration this module reads."""

    @property
    def name(self) -> str: ...

    @property
    def asynchronous_invocation(self) -> bool: ...


ConfigT = TypeVar("ConfigT", bound=EventRouteConfig)


class IngressEventSource(Generic[ConfigT]):
    """Base of a source whose events arrive on an ingress route served by the core."""

    event_kind: ClassVar[str]
    """How a log line names one of the source's events ("webhook message", "cloudevent")."""

    def __init__(self, config: ConfigT, log: logging.Logger) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        # Set by close(): a request still waiting for its outcome (?wait=true, Prefer: reply)
        # gets a 503 then, so a pending request cannot hold up the shutdown.
        self._closed = asyncio.Event()
        # Per-function detail is in fastconn.functions' aggregated lines; this says which events.
        self._undelivered_log = RateLimitedLog(log, interval=10.0)

    @property
    def asynchronous_invocation(self) -> bool:
        return self.config.asynchronous_invocation

    def _tell_ingress(self, *, accepting: bool | None = None, python: bool | None = None) -> None:
        """Passes the route's state to the core (None: unchanged); nothing without a server."""
        if self._ctx is not None and self._ctx.ingress is not None:
            self._ctx.ingress.set_webhook_state(self.name, accepting=accepting, python=python)

    def _on_accepted(self, messages: Sequence[Message]) -> None:
        if self._ctx is not None:
            self._ctx.count_received(self.name, messages)

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        if self._ctx is None:
            return
        self._ctx.count_settled(self.name, outcomes)
        warn_undelivered(self._undelivered_log, self.event_kind, outcomes)
