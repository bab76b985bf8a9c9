"""Prometheus view of the worker's and the sink's counters (read at scrape time).

The hot path only bumps plain integers in WorkerStats/SinkStats; this collector
turns them into metrics when Prometheus asks, so metering costs nothing extra.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import HTTPServer
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from processors.app import RollupWorker
from processors.timing import Timings

if TYPE_CHECKING:
    from processors.sink import Sink

Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


def _histogram(name: str, documentation: str, timings: Timings) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=timings.cumulative(), sum_value=timings.total_s
    )


class PipelineCollector(Collector):
    def __init__(self, worker: RollupWorker | None, sink: Sink | None) -> None:
        self.worker = worker
        self.sink = sink

    def collect(self) -> Iterator[Family]:
        if self.worker is not None:
            yield from _worker_metrics(self.worker)
        if self.sink is not None:
            yield from _sink_metrics(self.sink)


def _worker_metrics(worker: RollupWorker) -> Iterator[Family]:
    stats = worker.stats
    by_type = CounterMetricFamily(
        "tally_events_counted", "Valid events counted, by type", labels=["type"]
    )
    for kind, n in sorted(stats.by_type.items()):
        by_type.add_metric([kind], n)
    yield by_type
    dlq = CounterMetricFamily(
        "tally_dead_letters", "Messages or events sent to the DLQ", labels=["reason"]
    )
    for reason, n in sorted(stats.dlq_by_reason.items()):
        dlq.add_metric([reason], n)
    yield dlq
    yield CounterMetricFamily(
        "tally_duplicates_dropped", "Re-sent (source, id) events", value=stats.duplicates
    )
    yield CounterMetricFamily(
        "tally_worker_messages", "Kafka messages consumed", value=stats.messages
    )
    yield CounterMetricFamily(
        "tally_worker_transactions",
        "Kafka transactions committed",
        value=stats.transactions,
    )
    yield CounterMetricFamily(
        "tally_worker_fenced", "Partitions lost to another worker", value=stats.fenced
    )
    yield GaugeMetricFamily(
        "tally_dedup_keys",
        "Keys held in dedup memory",
        value=worker.pipeline.dedup_keys(),
    )
    yield GaugeMetricFamily(
        "tally_worker_last_flush_timestamp_seconds",
        "Unix time of the last batch",
        value=stats.last_flush_unix,
    )
    yield _histogram(
        "tally_worker_commit_seconds",
        "Time to commit one partition's Kafka transaction (deltas, DLQ, offset)",
        stats.commit_seconds,
    )
    lag = GaugeMetricFamily(
        "tally_worker_lag_messages",
        "Messages in the events log not yet counted, per partition this worker owns",
        labels=["partition"],
    )
    owned = worker.lag()
    for partition, behind in sorted(owned.items()):
        lag.add_metric([str(partition)], behind)
    yield lag
    yield GaugeMetricFamily(
        "tally_worker_partitions", "Events partitions this worker counts", value=len(owned)
    )


def _sink_metrics(owner: Sink) -> Iterator[Family]:
    sink = owner.stats
    yield CounterMetricFamily(
        "tally_sink_messages", "Delta messages applied to the store", value=sink.messages
    )
    yield CounterMetricFamily("tally_sink_rows", "Rollup rows written", value=sink.rows)
    yield CounterMetricFamily("tally_sink_inserts", "INSERTs into the store", value=sink.inserts)
    yield CounterMetricFamily(
        "tally_sink_duplicate_deltas",
        "Deltas skipped: their events were already counted (alert if above 0)",
        value=sink.duplicate_deltas,
    )
    yield CounterMetricFamily(
        "tally_sink_fenced",
        "Batches dropped because another sink took this one's partitions over",
        value=sink.fenced,
    )
    yield _histogram(
        "tally_sink_write_seconds",
        "Time to apply one batch of deltas to the store (one INSERT)",
        sink.write_seconds,
    )
    yield GaugeMetricFamily(
        "tally_sink_last_write_timestamp_seconds",
        "Unix time of the last INSERT",
        value=sink.last_write_unix,
    )
    reflected = GaugeMetricFamily(
        "tally_sink_reflected_timestamp_seconds",
        "Time up to which the store reflects each events partition",
        labels=["partition"],
    )
    for partition, ms in sorted(sink.reflected_ms.items()):
        reflected.add_metric([str(partition)], ms / 1000)
    yield reflected
    if sink.reflected_ms:
        # What meta.updated_at lags by: the stalest partition decides.
        oldest = min(sink.reflected_ms.values()) / 1000
        yield GaugeMetricFamily(
            "tally_sink_freshness_seconds",
            "Seconds the store's data lags behind now (stalest events partition)",
            value=max(0.0, time.time() - oldest),
        )


def serve_metrics(
    port: int, host: str, worker: RollupWorker | None, sink: Sink | None
) -> tuple[HTTPServer, CollectorRegistry]:
    """`tally worker` / `tally sink` alone: /metrics on a port of their own.

    A registry of its own, holding the pipeline's counters and the process's
    default collectors (the API, when in this process, keeps the global one).
    """
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    registry.register(PipelineCollector(worker, sink))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, registry
