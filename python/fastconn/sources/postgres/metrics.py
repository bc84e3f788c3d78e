"""The Postgres sources' own metrics, read from the sources at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastconn.scrape import SourceCollector, collector_for

if TYPE_CHECKING:
    from fastconn.sources.postgres.wal import WalSource  # noqa: F401 (the base class names it)

__all__ = ["postgres_collector"]


class _PostgresCollector(SourceCollector["WalSource"]):
    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        lag = GaugeMetricFamily(
            "fastconn_postgres_slot_lag_bytes",
            "WAL the replication slot holds on the server (current WAL position - confirmed position)",
            labels=["source", "slot"],
        )
        oldest = GaugeMetricFamily(
            "fastconn_postgres_oldest_pending_seconds",
            "Age of the oldest transaction read and not yet confirmed",
            labels=["source"],
        )
        stuck = GaugeMetricFamily(
            "fastconn_postgres_stuck_changes",
            "Changes being retried after failures (they hold the slot's confirmation)",
            labels=["source"],
        )
        pending = GaugeMetricFamily(
            "fastconn_postgres_pending_changes", "Changes read and not yet confirmed", labels=["source"]
        )
        holder = GaugeMetricFamily(
            "fastconn_postgres_slot_reader",
            "1 when this replica holds the slot's lock and reads",
            labels=["source"],
        )
        dead = CounterMetricFamily(
            "fastconn_postgres_dead_lettered", "Changes written to the dead-letter table", labels=["source"]
        )
        for s in self.sources:
            if s.slot_lag_bytes is not None:
                lag.add_metric([s.name, s.config.slot], s.slot_lag_bytes)
            oldest.add_metric([s.name], s.pending.oldest_age())
            stuck.add_metric([s.name], s.stuck)
            pending.add_metric([s.name], s.pending.changes)
            holder.add_metric([s.name], 1 if s.holds_lock else 0)
            dead.add_metric([s.name], s.counters["dead_lettered"])
        yield from (lag, oldest, stuck, pending, holder, dead)


def postgres_collector(registry: CollectorRegistry) -> _PostgresCollector:
    """The registry's collector (registered on first use)."""
    return collector_for(registry, _PostgresCollector)
