"""The small protocol every source implements, and the context the daemon gives it.

A source module ``fastconn.sources.<type>`` exposes ``CONFIG_MODEL`` (its pydantic config,
with ``type: Literal["<type>"]``) and ``create(config) -> Source``. Nothing else in fastconn
names a source: adding one is adding one module.

Lifecycle, driven by the daemon:

1. ``register(ctx)`` before anything starts: declare HTTP routes (``ctx.add_route``) if needed.
2. ``start()``: connect and begin intake. Return once connected; run intake in tasks.
3. ``stop()``: stop taking new messages (unsubscribe, pause, stop fetching). In-flight
   messages keep settling: the dispatcher is still running.
4. ``close()``: after the dispatcher drained: commit/ack what finished, disconnect.

A source with a connection to a broker also implements ``health() -> SourceHealth``
(:class:`HealthReporting`): ``(ok, reason, since)``, cheap (``/readyz`` calls it), usually kept
by a :class:`fastconn.health.ConnectionHealth` fed from the client's connection events, which
also logs the outage once. The daemon is not ready while a source has been down for longer
than ``[server] readiness_grace``. A source without a connection (the webhook) leaves it out
and counts as healthy. ``start()`` may be cancelled (a stop signal during start-up): it must
then close whatever it opened and re-raise.

A source whose messages may carry S3/MinIO bucket notifications declares a ``decode`` key
(:data:`fastconn.record_split.Decode`) and passes it to :meth:`SourceContext.submit` and
:meth:`SourceContext.resubmit`: the context splits each message into its records and hands the
source one outcome per message, so the source's settling stays as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fastconn.dispatcher import Dispatcher, OutcomeCallback
from fastconn.functions import FunctionTarget
from fastconn.health import SourceHealth
from fastconn.http_routes import Route, add_to_aiohttp
from fastconn.message import Message, Outcome, Verdict
from fastconn.record_split import Decode, split_records
from fastconn.supervise import Job, Supervisor

if TYPE_CHECKING:
    from aiohttp import web

    from fastconn.ingress import Ingress
    from fastconn.metrics import Metrics

__all__ = [
    "MAX_TOPIC_LABELS",
    "OTHER_TOPICS",
    "UNROUTED_TOPIC",
    "FunctionsListener",
    "HealthReporting",
    "Source",
    "SourceContext",
    "TopicsListener",
]

TopicsListener = Callable[[tuple[str, ...]], None]
FunctionsListener = Callable[[tuple[FunctionTarget, ...]], None]

# Topics come from outside (the webhook's is the URL path): one metric series per topic ever seen
# would grow without bound. Topics no function subscribes to share one label; routed topics get
# their own, up to a cap (wildcard subscriptions match unboundedly many), then share another.
UNROUTED_TOPIC = "(unrouted)"
OTHER_TOPICS = "(other)"
MAX_TOPIC_LABELS = 1000


@runtime_checkable
class Source(Protocol):
    name: str

    def register(self, ctx: SourceContext) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class HealthReporting(Protocol):
    """A source that can tell whether its broker connection is up (see the module docstring)."""

    def health(self) -> SourceHealth: ...


@dataclass
class SourceContext:
    """What a source may use. It never reaches into the daemon beyond this."""

    dispatcher: Dispatcher
    metrics: Metrics
    app: web.Application
    """The admin server's application: add routes in ``register``."""
    wait_ready: Callable[[float], Awaitable[bool]]
    """Waits (bounded) for the first topic map, so early messages are not dropped."""
    default_topics: tuple[str, ...] = ()
    """The connector-wide ``topics`` (OpenFaaS env ``topics``) for sources that subscribe."""
    print_request_body: bool = False
    startup_wait: float = 30.0
    supervisor: Supervisor | None = None
    """Runs the sources' background tasks (the daemon's, which its readiness reports on)."""
    ingress: Ingress | None = None
    """The ingress server in the core (``[server] listen``); None in a bare context, where
    routes go to ``app``."""
    _topic_listeners: list[TopicsListener] = field(default_factory=list)
    _function_listeners: list[FunctionsListener] = field(default_factory=list)
    _functions: tuple[FunctionTarget, ...] | None = None
    # Labelled children, looked up once: ``labels()`` costs microseconds, paid per batch.
    _children: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    _topics: tuple[str, ...] = ()
    _topic_label: dict[str, str] = field(default_factory=dict)
    """Routed topics that have a label of their own (at most MAX_TOPIC_LABELS)."""

    # -- topics ----------------------------------------------------------------------------

    @property
    def subscribed_topics(self) -> tuple[str, ...]:
        """The topics functions subscribe to now (for sources that subscribe per topic)."""
        return self._topics

    def on_topics_changed(self, listener: TopicsListener) -> None:
        self._topic_listeners.append(listener)

    def publish_topics(self, topics: tuple[str, ...]) -> None:
        """Called by the daemon when the topic map changes."""
        if topics == self._topics:
            return
        self._topics = topics
        for listener in self._topic_listeners:
            listener(topics)

    def on_functions_changed(self, listener: FunctionsListener) -> None:
        """``listener(targets)`` on every new function table (for sources driven by function
        settings, such as cron schedules); called at once when a table is already in force."""
        self._function_listeners.append(listener)
        if self._functions is not None:
            listener(self._functions)

    def publish_functions(self, targets: Sequence[FunctionTarget]) -> None:
        """Called by the daemon with every changed function table."""
        self._functions = tuple(targets)
        for listener in self._function_listeners:
            listener(self._functions)

    # -- HTTP ------------------------------------------------------------------------------

    def add_route(self, route: Route) -> None:
        """Serves ``route`` (a source's own HTTP endpoint) on the server the daemon runs. Call it
        in ``register``; the handler gets plain data (see :mod:`fastconn.http_routes`). The core
        reads the request within the route's limit and hands it to Python in batches."""
        if self.ingress is not None:
            self.ingress.add_route(route)
        else:
            add_to_aiohttp(self.app, route)

    # -- background tasks ------------------------------------------------------------------

    def supervise(self, name: str, job: Job) -> asyncio.Task[None]:
        """Runs ``job()`` as background task ``name`` (``<source>.<loop>``): restarted when it
        dies with an exception, counted, and reported by ``/readyz`` when it keeps dying."""
        if self.supervisor is None:
            self.supervisor = Supervisor(self.metrics.task_restarts)
        return self.supervisor.spawn(name, job)

    # -- dispatch --------------------------------------------------------------------------

    async def submit(
        self,
        source: str,
        messages: Sequence[Message],
        on_outcomes: OutcomeCallback,
        *,
        capture: bool = False,
        asynchronous: bool = False,
        decode: Decode = "none",
    ) -> None:
        """``dispatcher.submit`` plus the per-source metrics and request logging. Waits while
        the dispatcher is full: a source awaiting this should not fetch more. ``decode``: the
        source's ``decode`` key; with ``"s3"`` each message is split into its S3 records and
        ``on_outcomes`` still gets one outcome per message (see :mod:`fastconn.record_split`)."""
        await self._dispatch(source, messages, on_outcomes, capture, asynchronous, decode)

    async def resubmit(
        self,
        messages: Sequence[Message],
        on_outcomes: OutcomeCallback,
        *,
        capture: bool = False,
        asynchronous: bool = False,
        decode: Decode = "none",
    ) -> None:
        """Submits again messages that ``submit`` had (a retry in place): not counted as
        received again, split again with ``decode = "s3"``."""
        await self._dispatch(None, messages, on_outcomes, capture, asynchronous, decode)

    async def _dispatch(
        self,
        source: str | None,
        messages: Sequence[Message],
        on_outcomes: OutcomeCallback,
        capture: bool,
        asynchronous: bool,
        decode: Decode,
    ) -> None:
        """Submits (counted as received for ``source`` unless None), split with ``decode``."""
        if decode == "none":
            if messages and source is not None:
                self.count_received(source, messages)
            if messages:
                await self.dispatcher.submit(
                    messages, on_outcomes, capture=capture, asynchronous=asynchronous
                )
            return
        split = split_records(messages, on_outcomes)
        if source is not None and messages:
            self.count_received(source, [*split.records, *split.without_records])
        if split.records:
            await self.dispatcher.submit(
                split.records, split.on_outcomes, capture=capture, asynchronous=asynchronous
            )
        # Only once the records are in (a DispatcherClosed leaves the whole batch to the source).
        split.settle_without_records()

    def count_received(self, source: str, messages: Sequence[Message]) -> None:
        """Counts received messages per topic and logs them with ``print_request_body`` (done by
        ``submit``; for messages dispatched elsewhere: by the ingress in the core, or stored by a
        durable ingress store)."""
        counts = Counter(m.topic for m in messages)
        labels = self._topic_labels(list(counts))
        for topic, n in counts.items():
            self._received(source, labels[topic]).inc(n)
        if self.print_request_body:
            log = logging.getLogger(f"fastconn.source.{source}")
            for m in messages:
                log.info("%s => %r", m.topic, m.payload[:4096])

    def _topic_labels(self, topics: list[str]) -> dict[str, str]:
        """The ``topic`` label of each topic (see :data:`UNROUTED_TOPIC`)."""
        labels = self._topic_label
        unknown = [topic for topic in topics if topic not in labels]
        if not unknown:
            return labels
        found = {topic: labels[topic] for topic in topics if topic in labels}
        for topic, functions in zip(unknown, self.dispatcher.route(unknown), strict=True):
            if not functions:
                found[topic] = UNROUTED_TOPIC  # not remembered: the next table may route it
            elif len(labels) < MAX_TOPIC_LABELS:
                labels[topic] = found[topic] = topic
            else:
                found[topic] = OTHER_TOPICS
        return found

    def _received(self, source: str, topic: str) -> Any:
        key = ("received", source, topic)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metrics.messages_received.labels(source=source, topic=topic)
        return child

    def _source_counter(self, kind: str, source: str) -> Any:
        key = (kind, source, "")
        child = self._children.get(key)
        if child is None:
            counter = self.metrics.messages_acked if kind == "acked" else self.metrics.messages_failed
            child = self._children[key] = counter.labels(source=source)
        return child

    def count_settled(self, source: str, outcomes: Sequence[Outcome]) -> None:
        """Counts acknowledged (delivered or unrouted) and failed messages for a source that
        acknowledges on the verdict as is. Sources with their own redelivery count themselves."""
        acked = sum(1 for o in outcomes if o.verdict in (Verdict.OK, Verdict.UNROUTED))
        failed = len(outcomes) - acked
        if acked:
            self._source_counter("acked", source).inc(acked)
        if failed:
            self._source_counter("failed", source).inc(failed)


async def wait_or_stop(stop: asyncio.Event, timeout: float) -> bool:
    """Sleeps up to ``timeout``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except TimeoutError:
        return False
    return True
