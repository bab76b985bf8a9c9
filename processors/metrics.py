"""Prometheus view of the worker's and the sink's counters (read at scrape time).

The hot path only bumps plain integers in WorkerStats/SinkStats; this collector
turns them into metrics when Prometheus asks, so metering costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from processors.app import RollupWorker
from processors.sink import Sink


class PipelineCollector(Collector):
    def __init__(self, worker: RollupWorker | None, sink: Sink | None) -> None:
        self.worker = worker
        self.sink = sink

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.worker is not None:
            stats = self.worker.stats
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
                value=self.worker.pipeline.dedup_keys(),
            )
            yield GaugeMetricFamily(
                "tally_worker_last_flush_timestamp_seconds",
                "Unix time of the last batch",
                value=stats.last_flush_unix,
            )
        if self.sink is not None:
            sink = self.sink.stats
            yield CounterMetricFamily(
                "tally_sink_messages", "Delta messages applied to the store", value=sink.messages
            )
            yield CounterMetricFamily("tally_sink_rows", "Rollup rows written", value=sink.rows)
            yield CounterMetricFamily(
                "tally_sink_inserts", "INSERTs into the store", value=sink.inserts
            )
