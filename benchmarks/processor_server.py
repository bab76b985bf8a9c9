"""server_processor_events_per_s: two `tally worker` and one `tally sink` into a ClickHouse server.

benchmarks/processor.py's catch-up run on the server topology: the dataset topic is
full; two `tally worker` processes (one consumer group, splitting the partitions) and
one `tally sink` process (its INSERTs to the server) each run as their own process, as
deploy/compose.yaml and deploy/k8s run them, against a ClickHouse server started here
(deploy/clickhouse_local.py: ClickHouse's own server code, a process of its own too).
The bench's child process only drives and measures.

Before the clock, the same unmeasured warm-up as the processor bench (`warm_broker`,
`warm_pipeline`: the broker compiles its transaction paths). The clock starts once
all three processes have imported their code and built their apps (their metrics
endpoints answer; `server_processor_launch_s` is that wait) and stops when the store's
freshness markers say every events partition is counted up to the topic's end (read
from the server every POLL_S: unlike the embedded run, the sink is in another process,
so its own record is not at hand; each read costs the server a few ms). The store's
totals are then checked against the dataset (`server_processor_correct`).

Figures: server_processor_events_per_s, _elapsed_s, _launch_s, _correct,
_cpu_us_per_event (both workers, the sink and the server), _worker_cpu_us_per_event
(both workers), _sink_cpu_us_per_event, _clickhouse_cpu_us_per_event; run.py adds
server_processor_vs_embedded (this rate over `processor_events_per_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import _child, _procs
from benchmarks.dataset import Dataset, load
from benchmarks.processor import (
    TIMEOUT_S,
    all_counted,
    check,
    confirm,
    end_offsets,
    prepared,
    process_env,
    warm_broker,
    warm_pipeline,
)
from deploy.processes import free_port
from deploy.stack import ensure_rollups_topic
from schemas.gc_tuning import tune_gc
from schemas.rollup_table import RollupStore

if TYPE_CHECKING:
    from deploy.clickhouse_local import LocalClickHouse

WORKERS = 2
POLL_S = 0.1
PREFIX = "server_processor"


def run(bootstrap: str, workdir: Path, scale: float, dataset: Dataset) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "workdir": str(workdir), "dataset": dataset.as_dict()}
    log = _child.RESULTS / "server_processor.log"
    result = _child.spawn("benchmarks.processor_server", args, TIMEOUT_S, PREFIX, log)
    return {k: float(v) for k, v in result.items()}


async def _until_stored(
    rollups: RollupStore, children: list[_procs.Child], topic: str, ends: dict[int, int]
) -> None:
    """Poll the store's markers until every partition is counted to `ends`; a progress
    line a second (in benchmarks/results/server_processor.log)."""
    started = traced = time.perf_counter()
    while True:
        for child in children:
            child.check()
        done = await asyncio.to_thread(rollups.resume_offsets, topic)
        if all_counted(done, ends, started):
            return
        now = time.perf_counter()
        if now - traced >= 1.0:
            traced = now
            print(f"t={now - started:6.2f}s stored={sum(done.values())} of {sum(ends.values())}")
        await asyncio.sleep(POLL_S)


async def _measure_server(
    bootstrap: str, workdir: Path, ds: Dataset, server: LocalClickHouse
) -> dict[str, float]:
    settings, store = await prepared(bootstrap, workdir, ds, server.url)
    await ensure_rollups_topic(settings)
    ends = await end_offsets(bootstrap, ds.topic, ds.partitions)
    rollups = RollupStore(store)
    roles = [f"worker-{i + 1}" for i in range(WORKERS)] + ["sink"]
    ports = [free_port() for _ in roles]
    launched = time.perf_counter()
    with contextlib.ExitStack() as stack:
        children = [
            stack.enter_context(
                _procs.running(
                    role,
                    _procs.python_module("deploy.cli", role.split("-")[0]),
                    process_env(settings, port),
                    _child.RESULTS / f"server_processor-{role}.log",
                )
            )
            for role, port in zip(roles, ports, strict=True)
        ]
        for child, port in zip(children, ports, strict=True):
            url = f"http://127.0.0.1:{port}/metrics"
            await asyncio.to_thread(_procs.wait_http, url, child)
        if server.pid is None:
            raise RuntimeError(f"the ClickHouse server is gone; see {server.stdout_file}")
        pids = [child.pid for child in children] + [server.pid]
        cpu_before = [_procs.cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        await _until_stored(rollups, children, ds.topic, ends)
        elapsed = time.perf_counter() - started
        cpu = [_procs.cpu_seconds(pid) - was for pid, was in zip(pids, cpu_before, strict=True)]
    confirm(rollups, ds.topic, ends)
    correct, _ = check(store, ds)
    store.close()
    per_event = 1e6 / ds.events
    return {
        f"{PREFIX}_events_per_s": ds.events / elapsed,
        f"{PREFIX}_elapsed_s": elapsed,
        f"{PREFIX}_launch_s": started - launched,
        f"{PREFIX}_correct": 1.0 if correct else 0.0,
        f"{PREFIX}_cpu_us_per_event": sum(cpu) * per_event,
        f"{PREFIX}_worker_cpu_us_per_event": sum(cpu[:WORKERS]) * per_event,
        f"{PREFIX}_sink_cpu_us_per_event": cpu[WORKERS] * per_event,
        f"{PREFIX}_clickhouse_cpu_us_per_event": cpu[WORKERS + 1] * per_event,
    }


async def _measure(bootstrap: str, workdir: Path, ds: Dataset) -> dict[str, float]:
    await warm_broker(bootstrap)
    await warm_pipeline(bootstrap, workdir, ds)
    with _procs.clickhouse_server(workdir / "server-store") as server:
        return await _measure_server(bootstrap, workdir, ds, server)


def child(args: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as `tally worker` and `tally sink` do (schemas/gc_tuning.py)
    return asyncio.run(_measure(args["bootstrap"], Path(args["workdir"]), load(args["dataset"])))


if __name__ == "__main__":
    _child.main(child)
