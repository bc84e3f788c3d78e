"""Prometheus metrics. Per-invocation figures are counted in Rust (a few atomic adds per call)
and read on each scrape by a collector; Python-side counters are incremented per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fastconn import _core

FunctionStats = tuple[str, list[tuple[str, int]], list[int], float, int, int, list[tuple[str, int]]]
"""One function's counters as the core reports them (``Runtime.stats``, ``callbacks_stats``):
(function, final results by status, cumulative latency buckets, latency sum, count, retries,
every attempt by status)."""
StatsReader = Callable[[], list[FunctionStats]]
_BOUNDS = [*(str(b) for b in _core.LATENCY_BUCKETS), "+Inf"]


def add_function_stats(
    results: CounterMetricFamily, latency: HistogramMetricFamily, stats: FunctionStats
) -> None:
    """Adds one function's final results by status and its latency histogram."""
    function, by_status, buckets, total = stats[:4]
    for status, n in by_status:
        results.add_metric([function, status], n)
    latency.add_metric([function], list(zip(_BOUNDS, buckets, strict=True)), total)


class _CoreCollector(Collector):
    """Reads the Rust core's per-function counters at scrape time."""

    def __init__(self, read: Callable[[], StatsReader | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        invocations = CounterMetricFamily(
            "fastconn_invocations", "Final results of function calls", labels=["function", "status"]
        )
        duration = HistogramMetricFamily(
            "fastconn_invocation_duration_seconds",
            "Time from a call's first attempt to its final result",
            labels=["function"],
        )
        retries = CounterMetricFamily("fastconn_retries", "Retried call attempts", labels=["function"])
        attempts = CounterMetricFamily(
            "fastconn_attempts",
            "Every HTTP attempt's result, retried ones included",
            labels=["function", "status"],
        )
        reader = self._read()
        for stats in reader() if reader else []:
            function, retried, tried = stats[0], stats[5], stats[6]
            add_function_stats(invocations, duration, stats)
            retries.add_metric([function], retried)
            for status, n in tried:
                attempts.add_metric([function, status], n)
        yield invocations
        yield duration
        yield retries
        yield attempts


class Metrics:
    """Every metric fastconn exports, in one registry of its own (embedding apps keep theirs)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_received = Counter(
            "fastconn_messages_received", "Messages taken from sources", ["source", "topic"], registry=r
        )
        self.messages_acked = Counter(
            "fastconn_messages_acked", "Messages acknowledged to their source", ["source"], registry=r
        )
        self.messages_failed = Counter(
            "fastconn_messages_failed",
            "Messages that failed for good (dead-lettered or dropped by an at-most-once source)",
            ["source"],
            registry=r,
        )
        self.inflight = Gauge("fastconn_inflight", "HTTP calls on the wire", registry=r)
        self.queued = Gauge("fastconn_queued", "Messages accepted by the core, not yet completed", registry=r)
        self.topic_map_functions = Gauge(
            "fastconn_topic_map_functions", "Functions in the current topic map", registry=r
        )
        self.registry_failures = Counter("fastconn_topic_map_failures", "Failed gateway listings", registry=r)
        self.source_errors = Counter(
            "fastconn_source_errors", "Errors reported by sources", ["source", "kind"], registry=r
        )
        self.task_restarts = Counter(
            "fastconn_task_restarts",
            "Background tasks restarted after dying with an exception",
            ["task"],
            registry=r,
        )
        self.replies_published = Counter(
            "fastconn_replies_published",
            "CloudEvents reply events a reply_sink broker acknowledged",
            ["source"],
            registry=r,
        )
        self.ingress_python_requests = Counter(
            "fastconn_ingress_python_requests",
            "Requests the ingress server handed to a Python handler, by route (the metrics page, "
            "callbacks, a webhook needing the async layer, a store or decode = s3); every other "
            "request is served by the Rust core alone",
            ["route"],
            registry=r,
        )
        self._stats_reader: StatsReader | None = None
        r.register(_CoreCollector(lambda: self._stats_reader))

    def bind_core(self, reader: StatsReader, inflight: Callable[[], int], queued: Callable[[], int]) -> None:
        self._stats_reader = reader
        self.inflight.set_function(lambda: float(inflight()))
        self.queued.set_function(lambda: float(queued()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
