"""Source metrics read from the sources themselves at scrape time (a gauge of pending messages
costs nothing between scrapes): one collector per source type and registry, to which each
source of that type adds itself in ``register``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["SourceCollector", "collector_for"]

S = TypeVar("S")
C = TypeVar("C", bound="SourceCollector[Any]")


class SourceCollector(Collector, Generic[S]):
    """Reads ``sources`` (every source of one type on one registry) when scraped."""

    def __init__(self) -> None:
        self.sources: list[S] = []

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, dict[type[Any], Any]] = weakref.WeakKeyDictionary()


def collector_for(registry: CollectorRegistry, kind: type[C]) -> C:
    """The registry's collector of class ``kind``, created and registered on first use."""
    per_registry = _COLLECTORS.setdefault(registry, {})
    collector: C | None = per_registry.get(kind)
    if collector is None:
        collector = per_registry[kind] = kind()
        registry.register(collector)
    return collector
