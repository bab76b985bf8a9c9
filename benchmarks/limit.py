"""limit_events_per_s: the ceiling for one Python process on this broker and dataset.

aiokafka `getmany` over every partition of the dataset topic, `orjson.loads` of
each message, and a dict sum of units per account: no validation, no dedup, no
output. Whatever the worker does beyond this is its own overhead; the issue asks
for processor_vs_limit >= 0.5. An unmeasured read of the first WARM_EVENTS comes
first, as the processor bench runs its pipeline unmeasured first.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks import _child
from benchmarks.dataset import Dataset, load

TIMEOUT_S = 600.0
WARM_EVENTS = 300_000


def run(bootstrap: str, workdir: Path, scale: float, dataset: Dataset) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "dataset": dataset.as_dict()}
    result = _child.spawn("benchmarks.limit", args, TIMEOUT_S, profile_name="limit")
    return {k: float(v) for k, v in result.items()}


async def _read(bootstrap: str, ds: Dataset, stop_after: int | None = None) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        # The worker's fetch size (processors/app.py), so both read alike.
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    await consumer.start()
    try:
        tps = [TopicPartition(ds.topic, p) for p in range(ds.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        sums: dict[str, float] = {}
        events = 0
        while left:
            batches = await consumer.getmany(timeout_ms=1_000, max_records=20_000)
            for tp, records in batches.items():
                for record in records:
                    doc = orjson.loads(record.value)
                    for event in doc if isinstance(doc, list) else (doc,):
                        subject = event["subject"]
                        units = event["data"].get("units", 0.0)
                        sums[subject] = sums.get(subject, 0.0) + units
                        events += 1
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
            if stop_after is not None and events >= stop_after:
                return {}
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await consumer.stop()
    if events != ds.events:
        raise RuntimeError(f"read {events} events, the dataset has {ds.events}")
    return {
        "limit_events_per_s": events / elapsed,
        "limit_elapsed_s": elapsed,
        "limit_cpu_us_per_event": cpu / events * 1e6,
    }


async def _measure(bootstrap: str, ds: Dataset) -> dict[str, Any]:
    # Unmeasured first, as the processor bench warms the broker with its pipeline
    # (benchmarks/processor.py): both then read from a broker that has served them.
    await _read(bootstrap, ds, stop_after=WARM_EVENTS)
    return await _read(bootstrap, ds)


def child(args: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_measure(args["bootstrap"], load(args["dataset"])))


if __name__ == "__main__":
    _child.main(child)
