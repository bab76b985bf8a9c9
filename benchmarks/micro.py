"""CPU cost of the worker's pure hot path, per event and per rollup row (no Kafka, no store).

    .venv/bin/python -m benchmarks.micro [--events 200000]

Process CPU time (not wall time), best of three, so figures stay comparable on a
loaded machine; the before/after numbers in benchmarks/NOTES.md come from here.
Uses the bench dataset's generator and batch shape (200 events per message).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson

from benchmarks.dataset import BATCH_EVENTS, DUPLICATE_RATE, PARTITIONS, _Generator
from processors.decode import Limits, decode_flat, decode_message
from processors.pipeline import Message, Pipeline
from processors.rollup import RollupBuilder
from schemas.deltas import Delta, decode, encode, read, store_rows
from schemas.rollup_table import RollupRow


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def batch_messages(docs_by_partition: list[list[bytes]]) -> list[Message]:
    """Each partition's documents as batch messages of BATCH_EVENTS events."""
    found: list[Message] = []
    for p, docs in enumerate(docs_by_partition):
        for i in range(0, len(docs), BATCH_EVENTS):
            value = b"[" + b",".join(docs[i : i + BATCH_EVENTS]) + b"]"
            found.append(Message(p, i // BATCH_EVENTS, value, 0))
    return found


def _store_rows(messages: list[Message], now: datetime, limits: Limits) -> list[RollupRow]:
    """The messages' events folded into rows in the store's columns (the delta codec's
    input)."""
    builder = RollupBuilder()
    for m in messages:
        for event in decode_flat(m.value, now, limits)[0]:
            builder.add_flat(event)
    return store_rows(builder.wire_rows())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    args = parser.parse_args()
    n = args.events
    gen = _Generator(5, args.accounts, datetime.now(UTC) - timedelta(seconds=60), 60.0, n)
    by_partition: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    # The same events with the dataset's re-sent copies next to their originals.
    resent: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    rng = random.Random(7)
    for _ in range(n):
        _, p, doc = gen.next()
        raw = orjson.dumps(doc)
        by_partition[p].append(raw)
        resent[p].extend([raw, raw] if rng.random() < DUPLICATE_RATE else [raw])

    messages = batch_messages(by_partition)
    resent_messages = batch_messages(resent)
    resent_n = sum(len(docs) for docs in resent)
    now = datetime.now(UTC)
    limits = Limits()

    def loads() -> None:
        for m in messages:
            orjson.loads(m.value or b"")

    def decoding() -> None:
        for m in messages:
            decode_message(m.value, now, limits)

    def decoding_flat() -> None:
        for m in messages:
            decode_flat(m.value, now, limits)

    def processing() -> object:
        pipeline = Pipeline("t", limits, 3_600.0, 2_000_000)
        for p in range(PARTITIONS):
            pipeline.resume(p, 0)
        return pipeline.process(messages)

    def processing_as_the_worker(native: bool = True) -> object:
        # As RollupWorker._handle calls it: delta row parts, no cyclic GC during the fold.
        pipeline = Pipeline("t", limits, 3_600.0, 2_000_000, native=native)
        for p in range(PARTITIONS):
            pipeline.resume(p, 0)
        gc.disable()
        try:
            return pipeline.process(resent_messages)
        finally:
            gc.enable()

    rows = _store_rows(messages, now, limits)
    delta = Delta(0, 1, 0, rows)
    encoded = encode(delta)
    figures = {
        "orjson_loads_us_per_event": best(loads) / n * 1e6,
        "decode_message_us_per_event": best(decoding) / n * 1e6,
        "decode_flat_us_per_event": best(decoding_flat) / n * 1e6,
        "pipeline_process_us_per_event": best(processing) / n * 1e6,
        # The worker's call: with re-sent events (DUPLICATE_RATE), wire rows, GC off.
        "pipeline_worker_us_per_event": best(processing_as_the_worker) / resent_n * 1e6,
        # The same without tally_fold: the Python reference alone.
        "pipeline_worker_python_us_per_event": best(lambda: processing_as_the_worker(False))
        / resent_n
        * 1e6,
        "deltas_encode_us_per_row": best(lambda: encode(delta)) / len(rows) * 1e6,
        "deltas_decode_us_per_row": best(lambda: [decode(v) for v in encoded]) / len(rows) * 1e6,
        # What the sink does per message: read the header, pass the row part on.
        "deltas_read_us_per_row": best(lambda: [read(v).body for v in encoded]) / len(rows) * 1e6,
        "rows_per_event": len(rows) / n,
    }
    for name, value in figures.items():
        print(f"{name:<34} {value:8.3f}")


if __name__ == "__main__":
    main()
