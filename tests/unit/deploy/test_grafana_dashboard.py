"""deploy/grafana-dashboard.json queries only metrics that Tally exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry

from processors.metrics import PipelineCollector
from processors.sink import SinkStats
from processors.stats import WorkerStats
from query_api.metrics import REQUEST_SECONDS

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b(tally_[a-z0-9_]+)\b")


def _exported() -> set[str]:
    """Every series name the worker, the sink and the API expose (with their suffixes)."""
    sink = SinkStats()
    sink.reflected_ms[0] = int(time.time() * 1000)  # freshness appears once known
    worker = SimpleNamespace(
        stats=WorkerStats(), pipeline=SimpleNamespace(dedup_keys=lambda: 0), lag=lambda: {0: 0}
    )
    registry = CollectorRegistry()
    registry.register(PipelineCollector(cast(Any, worker), cast(Any, SimpleNamespace(stats=sink))))
    registry.register(REQUEST_SECONDS)
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in doc["panels"] for target in panel["targets"]]


def test_every_query_uses_exported_metrics_only() -> None:
    exported = _exported()
    expressions = _expressions()
    assert len(expressions) >= 10
    for expr in expressions:
        used = set(_METRIC.findall(expr))
        assert used, f"no Tally metric in {expr!r}"
        assert used <= exported, f"{expr!r} uses {sorted(used - exported)}, not exported"


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = {m for expr in _expressions() for m in _METRIC.findall(expr)}
    for needed in (
        "tally_events_counted_total",
        "tally_dead_letters_total",
        "tally_worker_lag_messages",
        "tally_worker_commit_seconds_bucket",
        "tally_sink_write_seconds_bucket",
        "tally_duplicates_dropped_total",
        "tally_api_request_seconds_count",
        "tally_api_request_seconds_bucket",
        "tally_sink_freshness_seconds",
    ):
        assert needed in used
