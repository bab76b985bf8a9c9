from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from processors.app import WorkerStats
from processors.metrics import PipelineCollector
from processors.sink import SinkStats


def test_the_collector_reports_the_live_counters() -> None:
    stats = WorkerStats(counted=7, duplicates=2, messages=3, transactions=4)
    stats.by_type["tally.request.v1"] = 7
    stats.dlq_by_reason["malformed_json"] = 1
    worker = SimpleNamespace(stats=stats, pipeline=SimpleNamespace(dedup_keys=lambda: 9))
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
