"""quixstreams_events_per_s: quixstreams doing the tumbling-window sum.

A StreamingDataFrame over the one-event-per-message copy of the dataset (keyed by
subject, so quixstreams groups windows per account): each event validated by the
same code as the worker (processors.decode), then a one-minute tumbling-window sum
of its units, in quixstreams' RocksDB state with its changelog topics, at-least-once
(its default). Windows use the Kafka timestamps, which the dataset sets at produce
time. quixstreams runs on librdkafka (confluent-kafka) against the same broker.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import _child
from benchmarks.dataset import Dataset, load
from processors.decode import Limits, decode_message

TIMEOUT_S = 600.0


def run(bootstrap: str, workdir: Path, scale: float, dataset: Dataset) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "workdir": str(workdir), "dataset": dataset.as_dict()}
    result = _child.spawn("benchmarks.quix", args, TIMEOUT_S, profile_name="quix")
    return {k: float(v) for k, v in result.items()}


def _measure(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    from quixstreams import Application

    name = f"bq{uuid.uuid4().hex[:8]}"
    app = Application(
        broker_address=bootstrap,
        consumer_group=name,
        auto_offset_reset="earliest",
        state_dir=str(workdir / "quix-state"),
        loglevel="WARNING",
    )
    topic = app.topic(ds.single_topic, value_deserializer="bytes", key_deserializer="str")
    limits = Limits()
    seen = 0
    first_at: float | None = None
    finished: float | None = None

    def units(value: bytes) -> float:
        nonlocal seen, first_at, finished
        if first_at is None:
            first_at = time.perf_counter()
        events, _ = decode_message(value, datetime.now(UTC), limits)
        seen += 1
        if seen >= ds.single_events and finished is None:
            finished = time.perf_counter()
            app.stop()
        total = 0.0
        for event in events:
            total += getattr(event.data, "units", 0.0)
        return total

    sdf = app.dataframe(topic)
    sdf = sdf.apply(units)
    sdf = sdf.tumbling_window(timedelta(minutes=1)).sum().current()
    started = time.perf_counter()
    app.run(sdf)
    if finished is None:
        raise RuntimeError(f"quixstreams stopped after {seen} of {ds.single_events} events")
    steady = (ds.single_events - 1) / (finished - first_at) if first_at else 0.0
    return {
        "quixstreams_events_per_s": ds.single_events / (finished - started),
        "quixstreams_steady_events_per_s": steady,
        "quixstreams_events": ds.single_events,
        "quixstreams_elapsed_s": finished - started,
    }


def child(args: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return _measure(args["bootstrap"], Path(args["workdir"]), load(args["dataset"]))


if __name__ == "__main__":
    _child.main(child)
