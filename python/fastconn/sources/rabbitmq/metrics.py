"""The RabbitMQ sources' own metrics, read from the sources at scrape time."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["rabbitmq_collector"]


class _Reporting(Protocol):
    name: str

    @property
    def stuck_messages(self) -> int: ...


class _RabbitMQCollector(Collector):
    """Metrics of every RabbitMQ source sharing one registry."""

    def __init__(self) -> None:
        self.sources: list[_Reporting] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stuck = GaugeMetricFamily(
            "fastconn_rabbitmq_stuck_messages",
            "Messages that failed for good with no dead-letter exchange, kept and retried every "
            "backoff_max (since this process started)",
            labels=["source"],
        )
        for source in self.sources:
            stuck.add_metric([source.name], source.stuck_messages)
        yield stuck


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _RabbitMQCollector] = weakref.WeakKeyDictionary()


def rabbitmq_collector(registry: CollectorRegistry) -> _RabbitMQCollector:
    collector = _COLLECTORS.get(registry)
    if collector is None:
        collector = _COLLECTORS[registry] = _RabbitMQCollector()
        registry.register(collector)
    return collector
