"""faust_naive_events_per_s: the textbook faust agent, one event per message.

`async for value in stream` over the one-event-per-message copy of the dataset
(its first `single_events` events), each event validated by the same code
(processors.decode), deduplicated by the same Deduplicator and folded into the same
minute rollups, with faust acknowledging and committing offsets itself. The
rollups stay in memory (nothing is published or stored), which flatters faust:
the worker's figure includes its transactions and the sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust

from benchmarks import _child
from benchmarks.dataset import Dataset, load
from processors.decode import Limits, decode_message
from processors.dedup import Deduplicator
from processors.rollup import RollupBuilder

TIMEOUT_S = 600.0


def run(bootstrap: str, workdir: Path, scale: float, dataset: Dataset) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "workdir": str(workdir), "dataset": dataset.as_dict()}
    result = _child.spawn("benchmarks.faust_naive", args, TIMEOUT_S, profile_name="faust_naive")
    return {k: float(v) for k, v in result.items()}


async def _measure(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    name = f"bf{uuid.uuid4().hex[:8]}"
    datadir = workdir / "faust-naive"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        name,
        broker=f"kafka://{bootstrap}",
        web_enabled=False,
        store="memory://",
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        topic_disable_leader=True,
    )
    topic = app.topic(ds.single_topic, value_type=bytes, value_serializer="raw")
    limits = Limits()
    dedup = Deduplicator(3_600.0, 2_000_000)
    rollups = RollupBuilder()
    seen = 0
    first_at: float | None = None
    done = asyncio.Event()

    @app.agent(topic, name=f"{name}.count")
    async def count(stream: Any) -> None:
        nonlocal seen, first_at
        async for value in stream:
            if first_at is None:
                first_at = time.perf_counter()
            events, _ = decode_message(value, datetime.now(UTC), limits)
            for event in events:
                if dedup.first_time(event.source, event.id):
                    rollups.add(event)
            seen += 1
            if seen >= ds.single_events:
                done.set()

    started = time.perf_counter()
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), TIMEOUT_S - 60)
        finished = time.perf_counter()
    finally:
        await app.stop()
    steady = (ds.single_events - 1) / (finished - first_at) if first_at else 0.0
    return {
        "faust_naive_events_per_s": ds.single_events / (finished - started),
        "faust_naive_steady_events_per_s": steady,
        "faust_naive_events": ds.single_events,
        "faust_naive_elapsed_s": finished - started,
    }


def child(args: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_measure(args["bootstrap"], Path(args["workdir"]), load(args["dataset"])))


if __name__ == "__main__":
    _child.main(child)
