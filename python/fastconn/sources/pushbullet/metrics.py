"""The Pushbullet sources' own metrics, read from the sources at scrape time."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["pushbullet_metrics"]


class _Counting(Protocol):
    name: str
    skipped: dict[str, int]

    @property
    def counters(self) -> dict[str, int]: ...

    @property
    def stuck_pushes(self) -> int: ...

    @property
    def outstanding_pushes(self) -> int: ...


class _PushbulletMetrics(Collector):
    def __init__(self) -> None:
        self.sources: list[_Counting] = []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        skipped = CounterMetricFamily(
            "fastconn_pushbullet_skipped_pushes",
            "Pushes read and not dispatched, by reason (unknown_channel: a channel_iden with no "
            "subscribed or owned channel; no_channel; filtered: not in channels; dismissed; malformed)",
            labels=["source", "reason"],
        )
        events = CounterMetricFamily(
            "fastconn_pushbullet_events",
            "Syncs, stream connections, keep-alive timeouts, 429 answers, dead letters, redeliveries",
            labels=["source", "event"],
        )
        stuck = GaugeMetricFamily(
            "fastconn_pushbullet_stuck_pushes",
            "Pushes being retried (the checkpoint waits)",
            labels=["source"],
        )
        outstanding = GaugeMetricFamily(
            "fastconn_pushbullet_outstanding_pushes",
            "Pushes read and not yet below the saved checkpoint (delivered again after a crash)",
            labels=["source"],
        )
        for source in self.sources:
            for reason, n in source.skipped.items():
                skipped.add_metric([source.name, reason], n)
            for event, n in source.counters.items():
                events.add_metric([source.name, event], n)
            stuck.add_metric([source.name], source.stuck_pushes)
            outstanding.add_metric([source.name], source.outstanding_pushes)
        yield skipped
        yield events
        yield stuck
        yield outstanding


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _PushbulletMetrics] = weakref.WeakKeyDictionary()


def pushbullet_metrics(registry: CollectorRegistry) -> _PushbulletMetrics:
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = _PushbulletMetrics()
        registry.register(found)
    return found
