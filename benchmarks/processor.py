"""processor_events_per_s: one worker end to end, with the real sink into chdb.

The dataset topic is full before the pipeline starts (a catch-up run). The clock
starts when `running_pipeline` (worker + sink in one event loop, as `tally up`
runs them) is entered and stops when the sink's freshness markers in the store say
every events partition is counted up to the topic's end: consumed, validated,
deduplicated, folded into minute rollups, published in transactions with the
offsets, and INSERTed into ClickHouse. The store's totals are then checked against
the dataset, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks import _child
from benchmarks.dataset import Dataset, load
from deploy.kafka_local import ensure_topics
from deploy.stack import running_pipeline
from processors.gc_tuning import tune_gc
from processors.settings import WorkerSettings
from processors.sink import RollupStore
from schemas.store import Store

TIMEOUT_S = 900.0


def run(bootstrap: str, workdir: Path, scale: float, dataset: Dataset) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "workdir": str(workdir), "dataset": dataset.as_dict()}
    result = _child.spawn(
        "benchmarks.processor",
        args,
        TIMEOUT_S,
        profile_name="processor",
        log=_child.RESULTS / "processor.log",
    )
    return {k: float(v) for k, v in result.items()}


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def _measure(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    name = f"bp{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        kafka_bootstrap=bootstrap,
        events_topic=ds.topic,
        rollups_topic=f"{name}.rollups",
        dlq_topic=f"{name}.dlq",
        consumer_group=f"{name}-worker",
        clickhouse_url=f"chdb://{workdir / 'processor-chdb'}",
        clickhouse_database=name,
        data_dir=workdir / "processor-data",
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    await ensure_topics(bootstrap, {settings.dlq_topic: 1})
    ends = await end_offsets(bootstrap, ds.topic, ds.partitions)
    rollups = RollupStore(store)
    first_at = first_events = None
    cpu_started = time.process_time()
    started = time.perf_counter()
    async with running_pipeline(settings, store) as (worker, sink):
        entered = time.perf_counter()
        traced = 0.0
        while True:
            now = time.perf_counter()
            if now - traced >= 1.0:  # a timeline in processor.log, to see where time goes
                traced = now
                print(
                    f"t={now - started:6.2f}s worker messages={worker.stats.messages} "
                    f"counted={worker.stats.counted} tx={worker.stats.transactions} "
                    f"sink messages={sink.stats.messages} rows={sink.stats.rows} "
                    f"inserts={sink.stats.inserts}",
                    flush=True,
                )
            if first_at is None and worker.stats.messages:
                first_at = now
                first_events = worker.stats.counted + worker.stats.duplicates
            done = await asyncio.to_thread(rollups.resume_offsets, ds.topic)
            if all(done.get(p, 0) >= end for p, end in ends.items()):
                break
            if now - started > TIMEOUT_S - 60:
                raise RuntimeError(f"not done after {now - started:.0f}s: {done} of {ends}")
            await asyncio.sleep(0.1)
        finished = time.perf_counter()
        cpu = time.process_time() - cpu_started
        stats = worker.stats
        sink_inserts, sink_rows = sink.stats.inserts, sink.stats.rows
    total = store.query(
        "SELECT sum(events), sum(units_micro), count() FROM rollup_minute WHERE account != ''"
    )[0]
    store.close()
    elapsed = finished - started
    counted, units, rows = int(total[0] or 0), int(total[1] or 0), int(total[2] or 0)
    correct = counted == ds.unique_events and units == ds.units_micro
    if not correct:
        logging.error(
            "store holds %d events / %d units, expected %d / %d",
            counted,
            units,
            ds.unique_events,
            ds.units_micro,
        )
    steady = None
    if first_at is not None and first_events is not None and finished > first_at:
        steady = (ds.events - first_events) / (finished - first_at)
    return {
        "processor_events_per_s": ds.events / elapsed,
        "processor_elapsed_s": elapsed,
        # CPU time of the whole process (every thread, chdb's included) per event:
        # steadier than wall time when other work shares the machine.
        "processor_cpu_us_per_event": cpu / ds.events * 1e6,
        "processor_startup_s": (first_at - started) if first_at else elapsed,
        "processor_pipeline_start_s": entered - started,
        "processor_steady_events_per_s": steady or 0.0,
        "processor_correct": 1.0 if correct else 0.0,
        "processor_duplicates_dropped": stats.duplicates,
        "processor_transactions": stats.transactions,
        "processor_batches": stats.flushes,
        "processor_rollup_rows": rows,
        "processor_sink_inserts": sink_inserts,
        "processor_sink_rows": sink_rows,
    }


def child(args: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as `tally worker` and `tally up` do (processors/gc_tuning.py)
    return asyncio.run(_measure(args["bootstrap"], Path(args["workdir"]), load(args["dataset"])))


if __name__ == "__main__":
    _child.main(child)
