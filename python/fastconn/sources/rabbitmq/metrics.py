"""The RabbitMQ sources' own metrics, read from the sources at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from fastconn.scrape import SourceCollector, collector_for

__all__ = ["rabbitmq_collector"]


class _Reporting(Protocol):
    name: str

    @property
    def stuck_messages(self) -> int: ...


class _RabbitMQCollector(SourceCollector["_Reporting"]):
    """Metrics of every RabbitMQ source sharing one registry."""

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


def rabbitmq_collector(registry: CollectorRegistry) -> _RabbitMQCollector:
    """The registry's collector (registered on first use)."""
    return collector_for(registry, _RabbitMQCollector)
