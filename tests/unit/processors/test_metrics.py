from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from processors.metrics import PipelineCollector
from processors.sink import SinkStats
from processors.stats import WorkerStats


def test_the_collector_reports_the_live_counters() -> None:
    stats = WorkerStats(counted=7, duplicates=2, messages=3, transactions=4)
    stats.by_type["tally.request.v1"] = 7
    stats.dlq_by_reason["malformed_json"] = 1
    worker = SimpleNamespace(
        stats=stats, pipeline=SimpleNamespace(dedup_keys=lambda: 9), lag=lambda: {0: 3, 5: 0}
    )
    sink = SimpleNamespace(stats=SinkStats(messages=5, rows=11, inserts=2))
    registry = CollectorRegistry()
    registry.register(PipelineCollector(cast(Any, worker), cast(Any, sink)))
    text = generate_latest(registry).decode()
    assert 'tally_events_counted_total{type="tally.request.v1"} 7.0' in text
    assert 'tally_dead_letters_total{reason="malformed_json"} 1.0' in text
    assert "tally_duplicates_dropped_total 2.0" in text
    assert "tally_dedup_keys 9.0" in text
    assert "tally_sink_rows_total 11.0" in text
    stats.by_type["tally.request.v1"] = 8  # read at scrape time, not copied
    assert 'tally_events_counted_total{type="tally.request.v1"} 8.0' in (
        generate_latest(registry).decode()
    )


def test_latencies_lag_and_freshness_are_exported() -> None:
    stats = WorkerStats()
    for seconds in (0.002, 0.002, 0.3, 100.0):
        stats.commit_seconds.observe(seconds)
    worker = SimpleNamespace(
        stats=stats, pipeline=SimpleNamespace(dedup_keys=lambda: 0), lag=lambda: {2: 40, 0: 0}
    )
    sink_stats = SinkStats()
    sink_stats.write_seconds.observe(0.02)
    now = time.time()
    sink_stats.reflected_ms = {0: int((now - 5) * 1000), 1: int((now - 65) * 1000)}
    registry = CollectorRegistry()
    registry.register(
        PipelineCollector(cast(Any, worker), cast(Any, SimpleNamespace(stats=sink_stats)))
    )
    text = generate_latest(registry).decode()
    assert 'tally_worker_commit_seconds_bucket{le="0.0025"} 2.0' in text
    assert 'tally_worker_commit_seconds_bucket{le="0.5"} 3.0' in text
    assert 'tally_worker_commit_seconds_bucket{le="30.0"} 3.0' in text
    assert 'tally_worker_commit_seconds_bucket{le="+Inf"} 4.0' in text
    assert "tally_worker_commit_seconds_count 4.0" in text
    assert 'tally_worker_lag_messages{partition="2"} 40.0' in text
    assert 'tally_worker_lag_messages{partition="0"} 0.0' in text
    assert "tally_worker_partitions 2.0" in text
    assert 'tally_sink_write_seconds_bucket{le="0.025"} 1.0' in text
    freshness = next(
        line for line in text.splitlines() if line.startswith("tally_sink_freshness_seconds ")
    )
    # The stalest partition decides: 65 s, not 5 s.
    assert 64 < float(freshness.split()[1]) < 70
