"""The Kafka sources' own metrics, read from the sources at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastconn.scrape import SourceCollector, collector_for

if TYPE_CHECKING:
    from fastconn.sources.kafka.source import KafkaSource  # noqa: F401 (the base class names it)

__all__ = ["kafka_collector"]


class _KafkaCollector(SourceCollector["KafkaSource"]):
    """Kafka metrics of every Kafka source sharing one registry, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stuck = GaugeMetricFamily(
            "fastconn_kafka_stuck_messages",
            "Messages being redelivered after failures (not done, holding their partition's commit)",
            labels=["source"],
        )
        pending = GaugeMetricFamily(
            "fastconn_kafka_pending_messages",
            "Messages fetched and not yet below the committed watermark",
            labels=["source", "topic", "partition"],
        )
        committed = GaugeMetricFamily(
            "fastconn_kafka_committed_offset",
            "Last committed offset (next offset to read)",
            labels=["source", "topic", "partition"],
        )
        assigned = GaugeMetricFamily(
            "fastconn_kafka_assigned_partitions", "Partitions assigned", labels=["source"]
        )
        paused = GaugeMetricFamily(
            "fastconn_kafka_paused_partitions",
            "Partitions paused because their pending budget is used up",
            labels=["source"],
        )
        duplicates = CounterMetricFamily(
            "fastconn_kafka_rebalance_duplicates",
            "Messages past the committed offset of revoked partitions "
            "(delivered, in flight or retrying): the next owner reads them "
            "again",
            labels=["source"],
        )
        rebalances = CounterMetricFamily(
            "fastconn_kafka_rebalances", "Partition assignments received", labels=["source"]
        )
        dead = CounterMetricFamily(
            "fastconn_kafka_dead_lettered", "Messages written to the dead-letter topic", labels=["source"]
        )
        shrunk = CounterMetricFamily(
            "fastconn_kafka_dead_letters_shrunk",
            "Dead letters the broker refused as too large, sent with the payload cut "
            "(fastconn-dlt-truncated) or the message's headers left out",
            labels=["source"],
        )
        redeliveries = CounterMetricFamily(
            "fastconn_kafka_redeliveries",
            "Messages resubmitted after a RETRY or FAILED verdict",
            labels=["source"],
        )
        responses = CounterMetricFamily(
            "fastconn_kafka_responses_published",
            "Function responses published to the response topic",
            labels=["source"],
        )
        commits = CounterMetricFamily(
            "fastconn_kafka_commits", "Successful offset commits", labels=["source"]
        )
        for source in self.sources:
            name = source.name
            stuck.add_metric([name], source.stuck_messages)
            parts = list(source.partitions())
            assigned.add_metric([name], len(parts))
            paused.add_metric([name], sum(1 for p in parts if p.paused))
            for p in parts:
                labels = [name, p.tp.topic, str(p.tp.partition)]
                pending.add_metric(labels, p.mark.outstanding)
                if p.mark.committed is not None:
                    committed.add_metric(labels, p.mark.committed)
            s = source.counters
            duplicates.add_metric([name], s["duplicates"])
            rebalances.add_metric([name], s["rebalances"])
            dead.add_metric([name], s["dead_lettered"])
            shrunk.add_metric([name], s["dead_letters_shrunk"])
            redeliveries.add_metric([name], s["redeliveries"])
            responses.add_metric([name], s["responses"])
            commits.add_metric([name], s["commits"])
        yield from (
            stuck,
            pending,
            committed,
            assigned,
            paused,
            duplicates,
            rebalances,
            dead,
            shrunk,
            redeliveries,
            responses,
            commits,
        )


def kafka_collector(registry: CollectorRegistry) -> _KafkaCollector:
    """The registry's collector (registered on first use)."""
    return collector_for(registry, _KafkaCollector)
