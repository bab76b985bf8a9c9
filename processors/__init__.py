"""The worker and the sink: what other packages may use of them, in one place.

`deploy` starts workers and sinks (`build_app`, `RollupWorker`, `Sink`, their
metrics); the API's ingest endpoint and `tally reconcile` judge events by the
very same validation the worker applies (`decode_message`, `Limits`,
`WorkerSettings`, `Recount`). Everything else in this package is internal to it;
what the worker, the sink and the API share (the rollup table, the deltas' wire
format, windows, totals) lives in `schemas`.

Names load on first use: the API imports the validation without pulling in faust.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from processors.app import RollupWorker, build_app
    from processors.decode import NATIVE_MAX_EVENT_BYTES, Limits, decode_message
    from processors.metrics import PipelineCollector, serve_metrics
    from processors.reconcile import Recount, RecountStats
    from processors.settings import WorkerSettings
    from processors.sink import Sink

_HOMES = {
    "RollupWorker": "processors.app",
    "build_app": "processors.app",
    "NATIVE_MAX_EVENT_BYTES": "processors.decode",
    "Limits": "processors.decode",
    "decode_message": "processors.decode",
    "PipelineCollector": "processors.metrics",
    "serve_metrics": "processors.metrics",
    "Recount": "processors.reconcile",
    "RecountStats": "processors.reconcile",
    "WorkerSettings": "processors.settings",
    "Sink": "processors.sink",
}

__all__ = [
    "NATIVE_MAX_EVENT_BYTES",
    "Limits",
    "PipelineCollector",
    "Recount",
    "RecountStats",
    "RollupWorker",
    "Sink",
    "WorkerSettings",
    "build_app",
    "decode_message",
    "serve_metrics",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'processors' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
