"""processor_events_per_s: one worker end to end, with the real sink into chdb.

The dataset topic is full before the pipeline starts (a catch-up run). Two runs:

- the headline (`processor_*`): `tally worker` as its own process, and the sink
  (`tally sink`'s code) in the bench's child process, which holds the store: the
  production layout (deploy/compose.yaml, deploy/k8s), where worker and sink are
  separate services and each gets a core. The clock starts when the worker process
  has imported its code and built its app (its metrics endpoint answers; the
  launch itself is `processor_worker_launch_s`) and stops when the sink's
  freshness markers in the store say every events partition is counted up to
  the topic's end: consumed, validated,
  deduplicated, folded into minute rollups, published in transactions with the
  offsets, and INSERTed into ClickHouse. `processor_worker_events_per_s` stops
  the clock instead when the worker's committed offsets reach the end (its own
  part, rollups published and offsets committed in the same transactions);
- `processor_one_loop_*`: worker and sink in one event loop, as `tally up` runs
  them (`running_pipeline`): one core for both.

After each, the store's totals are checked against the dataset, so a fast wrong
answer cannot pass. Before both, the pipeline runs unmeasured over the dataset's
first WARM_EVENTS, so that the broker has compiled its transaction paths
(`warm_pipeline`); the limit bench reads unmeasured first too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from benchmarks import _child, _procs
from benchmarks.dataset import Dataset, load
from deploy.kafka_local import ensure_topics
from deploy.processes import free_port
from deploy.stack import ensure_rollups_topic, new_sink, running_pipeline
from processors.settings import WorkerSettings
from processors.sink import Sink
from schemas.gc_tuning import tune_gc
from schemas.rollup_table import MARKER_ACCOUNT, RollupStore
from schemas.store import Store

TIMEOUT_S = 900.0
WARM_EVENTS = 300_000


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


def _settings(
    bootstrap: str, workdir: Path, ds: Dataset, store_url: str | None = None
) -> WorkerSettings:
    """A run's own topics, group and database; on the embedded store unless `store_url`."""
    name = f"bp{uuid.uuid4().hex[:8]}"
    return WorkerSettings(
        kafka_bootstrap=bootstrap,
        events_topic=ds.topic,
        rollups_topic=f"{name}.rollups",
        dlq_topic=f"{name}.dlq",
        consumer_group=f"{name}-worker",
        clickhouse_url=store_url or f"chdb://{workdir / 'processor-chdb'}",
        clickhouse_database=name,
        data_dir=workdir / f"processor-data-{name}",
    )


async def prepared(
    bootstrap: str, workdir: Path, ds: Dataset, store_url: str | None = None
) -> tuple[WorkerSettings, Store]:
    """A run's own names, its database migrated and its dead-letter topic created."""
    settings = _settings(bootstrap, workdir, ds, store_url)
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    await ensure_topics(bootstrap, {settings.dlq_topic: 1})
    return settings, store


def check(store: Store, ds: Dataset) -> tuple[bool, int]:
    """Whether the store's totals are the dataset's; and its rollup row count."""
    total = store.query(
        "SELECT sum(events), sum(units_micro), count() FROM rollup_minute"
        " WHERE account != {marker_account:String}",
        {"marker_account": MARKER_ACCOUNT},
    )[0]
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
    return correct, rows


async def _measure_one_loop(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    settings, store = await prepared(bootstrap, workdir, ds)
    ends = await end_offsets(bootstrap, ds.topic, ds.partitions)
    rollups = RollupStore(store)
    first_at = first_events = None
    cpu_started = time.process_time()
    started = time.perf_counter()
    async with running_pipeline(settings, store) as (worker, sink):
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
            if all_counted(sink.stats.counted, ends, started):
                break
            await asyncio.sleep(0.1)
        finished = time.perf_counter()
        cpu = time.process_time() - cpu_started
    confirm(rollups, ds.topic, ends)
    correct, _ = check(store, ds)
    store.close()
    elapsed = finished - started
    steady = None
    if first_at is not None and first_events is not None and finished > first_at:
        steady = (ds.events - first_events) / (finished - first_at)
    return {
        "processor_one_loop_events_per_s": ds.events / elapsed,
        "processor_one_loop_correct": 1.0 if correct else 0.0,
        "processor_one_loop_cpu_us_per_event": cpu / ds.events * 1e6,
        "processor_one_loop_steady_events_per_s": steady or 0.0,
        "processor_one_loop_elapsed_s": elapsed,
    }


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus counters (unlabelled samples, and sums over labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            found[match[1]] = found.get(match[1], 0.0) + float(match[2])
    return found


async def _committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    try:
        found = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # no coordinator before the worker's first commit
        return {}
    return {tp.partition: om.offset for tp, om in found.items() if tp.topic == topic}


def all_counted(done: dict[int, int], ends: dict[int, int], since: float) -> bool:
    """Whether `done` (per events partition, the offset the store counts to) reaches
    `ends`; raises once the bench has run out of time.

    Read from the sink's own record of the markers it wrote: querying the store
    for them ten times a second cost the sink's process CPU the pipeline needs
    (~5 ms a query on the embedded engine). `confirm` reads the store once after.
    """
    if reaches(done, ends):
        return True
    if time.perf_counter() - since > TIMEOUT_S - 60:
        raise RuntimeError(f"not done after {time.perf_counter() - since:.0f}s: {done} of {ends}")
    return False


def confirm(rollups: RollupStore, topic: str, ends: dict[int, int]) -> None:
    """The store's freshness markers say what the sink said it stored."""
    stored = rollups.resume_offsets(topic)
    if not reaches(stored, ends):
        raise RuntimeError(f"the store's markers {stored} fall short of {ends}")


def reaches(offsets: dict[int, int], ends: dict[int, int]) -> bool:
    return all(offsets.get(p, 0) >= end for p, end in ends.items())


def _profile_worker(pid: int) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE=py-spy, record the worker process's stacks too.

    Attached by pid rather than wrapping the command, so that the worker's own
    CPU figure still measures the worker, not py-spy.
    """
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if os.environ.get("BENCH_PROFILE", "") != "py-spy" or pyspy is None:
        return None
    out = _child.RESULTS / "processor-worker.pyspy.txt"
    cmd = [pyspy, "record", "-r", "200", "-f", "raw", "-o", str(out), "--pid", str(pid)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


async def _until_counted(
    admin: AIOKafkaAdminClient,
    worker: _procs.Child,
    sink: Sink,
    group: str,
    topic: str,
    ends: dict[int, int],
    started: float,
) -> float | None:
    """Poll until the store counts every event; when the worker committed its last
    offsets (perf_counter), None if it had not by then. A progress line a second."""
    traced = 0.0
    committed: dict[int, int] = {}
    worker_done: float | None = None
    while True:
        worker.check()
        now = time.perf_counter()
        if worker_done is None:
            committed = await _committed(admin, group, topic)
            if reaches(committed, ends):
                worker_done = now
        if now - traced >= 1.0:
            traced = now
            print(
                f"t={now - started:6.2f}s worker committed={sum(committed.values())} "
                f"done={worker_done is not None} "
                f"sink messages={sink.stats.messages} rows={sink.stats.rows} "
                f"inserts={sink.stats.inserts}",
                flush=True,
            )
        if all_counted(sink.stats.counted, ends, started):
            return worker_done
        await asyncio.sleep(0.1)


def process_env(settings: WorkerSettings, metrics_port: int) -> dict[str, str]:
    """The environment of a `tally worker` or `tally sink` of this run."""
    return _procs.child_env(
        {
            "TALLY_KAFKA_BOOTSTRAP": settings.bootstrap,
            "TALLY_EVENTS_TOPIC": settings.events_topic,
            "TALLY_ROLLUPS_TOPIC": settings.rollups_topic,
            "TALLY_DLQ_TOPIC": settings.dlq_topic,
            "TALLY_CONSUMER_GROUP": settings.consumer_group,
            "TALLY_CLICKHOUSE_URL": settings.store_url,
            "TALLY_CLICKHOUSE_DATABASE": settings.store_database,
            "TALLY_DATA_DIR": str(settings.data_dir),
            "TALLY_METRICS_PORT": str(metrics_port),
        }
    )


async def _measure_split(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    settings, store = await prepared(bootstrap, workdir, ds)
    await ensure_rollups_topic(settings)
    ends = await end_offsets(bootstrap, ds.topic, ds.partitions)
    rollups = RollupStore(store)
    port = free_port()
    env = process_env(settings, port)
    sink = new_sink(settings, store)
    log = _child.RESULTS / "processor-worker.log"
    log.unlink(missing_ok=True)
    launched = time.perf_counter()
    with _procs.running("worker", _procs.python_module("deploy.cli", "worker"), env, log) as w:
        # The clock starts once the worker process has imported its code and built
        # its app (its metrics endpoint answers), as the one-loop run's starts after
        # this process's imports: both then include the faust app's start.
        await asyncio.to_thread(_procs.wait_http, f"http://127.0.0.1:{port}/metrics", w)
        worker_cpu_started = _procs.cpu_seconds(w.pid)
        cpu_started = time.process_time()
        started = time.perf_counter()
        applying = asyncio.ensure_future(sink.run())
        profiler = _profile_worker(w.pid)
        # One client for the whole run: this process is the sink's, and its CPU is
        # the sink's figure, so polling must not connect anew every 0.1 s.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            worker_done = await _until_counted(
                admin, w, sink, settings.consumer_group, ds.topic, ends, started
            )
            finished = time.perf_counter()
            sink_cpu = time.process_time() - cpu_started
            worker_cpu = _procs.cpu_seconds(w.pid) - worker_cpu_started
            metrics = scrape(port)
        finally:
            await admin.close()
            _stop_profiler(profiler)
            sink.stop()
            await applying
    confirm(rollups, ds.topic, ends)
    correct, rows = check(store, ds)
    store.close()
    elapsed = finished - started
    worker_elapsed = (worker_done or finished) - started
    return {
        "processor_events_per_s": ds.events / elapsed,
        "processor_elapsed_s": elapsed,
        "processor_worker_launch_s": started - launched,
        "processor_worker_events_per_s": ds.events / worker_elapsed,
        "processor_worker_elapsed_s": worker_elapsed,
        # CPU of both processes (every thread, chdb's included) per event: steadier
        # than wall time when other work shares the machine.
        "processor_cpu_us_per_event": (worker_cpu + sink_cpu) / ds.events * 1e6,
        "processor_worker_cpu_us_per_event": worker_cpu / ds.events * 1e6,
        "processor_sink_cpu_us_per_event": sink_cpu / ds.events * 1e6,
        "processor_correct": 1.0 if correct else 0.0,
        "processor_duplicates_dropped": metrics.get("tally_duplicates_dropped_total", 0.0),
        "processor_transactions": metrics.get("tally_worker_transactions_total", 0.0),
        "processor_rollup_rows": rows,
        "processor_sink_inserts": sink.stats.inserts,
        "processor_sink_rows": sink.stats.rows,
    }


async def warm_broker(bootstrap: str) -> None:
    """Have the broker create its internal topics before any clock starts.

    The first consumer group and the first transactional producer on a new broker make
    it create __consumer_offsets and __transaction_state, and the first clients wait
    for them (GroupCoordinatorNotAvailable, then retries): seconds once, in this
    bench's first measured run only. A broker in service has both, so a worker's
    start there never pays for them.
    """
    name = f"warm{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {name: 1})
    tp = TopicPartition(name, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=name)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 0})
    finally:
        await consumer.stop()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=name)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(name, b"warm")
    finally:
        await producer.stop()


async def warm_pipeline(bootstrap: str, workdir: Path, ds: Dataset) -> None:
    """Run the pipeline over the first WARM_EVENTS of the dataset, unmeasured.

    The broker is a fresh JVM: its first transactions, read_committed fetches and
    offset commits run interpreted while its JIT compiles them, ~2.5 CPU seconds of
    compiling measured during the processor's clock (benchmarks/NOTES.md) on a
    machine whose two cores the worker, the sink and the broker share. A broker
    in service has compiled them long before. The faust and quixstreams benches
    run after this one, on the same warm broker.
    """
    settings, store = await prepared(bootstrap, workdir, ds)
    started = time.perf_counter()
    warm = min(WARM_EVENTS, ds.unique_events)  # a small dataset holds fewer
    try:
        async with running_pipeline(settings, store) as (worker, sink):
            while time.perf_counter() - started < 30:
                if worker.stats.counted >= warm and sink.stats.inserts >= 2:
                    break
                await asyncio.sleep(0.1)
    finally:
        store.close()
    print(
        f"warm-up: {worker.stats.counted} events counted, {sink.stats.rows} rows stored "
        f"in {time.perf_counter() - started:.1f}s (not measured)",
        flush=True,
    )


async def _measure(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, Any]:
    await warm_broker(bootstrap)
    await warm_pipeline(bootstrap, workdir, ds)
    split = await _measure_split(bootstrap, workdir, ds)
    return {**split, **await _measure_one_loop(bootstrap, workdir, ds)}


def child(args: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as `tally worker` and `tally up` do (schemas/gc_tuning.py)
    return asyncio.run(_measure(args["bootstrap"], Path(args["workdir"]), load(args["dataset"])))


if __name__ == "__main__":
    _child.main(child)
