"""Freshness on the server topology: event time -> visible on EVERY API replica.

benchmarks/freshness.py's run (its background load at 50,000 events/s, its probes,
its figures), but the pipeline is `tally up --store server --workers 1 --sinks 1
--api-replicas 2` against the bench's broker and a ClickHouse server of its own
(deploy/clickhouse_local.py): every piece a process of its own, each replica's usage
view fed by its snapshot and `tally.rollups` (query_api/view_feed.py). A probe counts
as visible once both replicas answer it; its delay is until the later of the two.

Figures: freshness_replicas_p50_s, _p99_s, _max_s, _probes, _lost, _load_events_per_s
_counted_events_per_s (events the sink stored in the server meanwhile, read from
the store at the start and the end of the probes) and _pipeline_cores (CPU of `tally
up`, its children and the ClickHouse server over the probes); run.py adds
freshness_replicas_vs_embedded (this p99 over `freshness`'s, when both ran).
"""

from __future__ import annotations

import pathlib
import uuid

from benchmarks._procs import clickhouse_server, consecutive_free_ports, python_module
from benchmarks.freshness import Pipeline, measure, up_settings

REPLICAS = 2
WORKERS = 1
"""One worker counts 50k events/s with room to spare (processor_events_per_s); on the
bench's two cores a second would only take CPU from the replicas and the sink."""
DATABASE = "tally"


def stored_events(url: str) -> int:
    """Events the sink has stored in the server so far (marker rows excluded)."""
    from schemas.store import Store

    store = Store(url, DATABASE)
    try:
        rows = store.query("SELECT sum(events) FROM rollup_minute WHERE account != ''")
    finally:
        store.close()
    return int(rows[0][0] or 0)


def run(bootstrap: str, workdir: pathlib.Path, scale: float) -> dict[str, float]:
    workdir = pathlib.Path(workdir) / "freshness_replicas"
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"bench-replicas-{uuid.uuid4().hex[:8]}"
    port = consecutive_free_ports(REPLICAS)
    with clickhouse_server(workdir) as server:
        store = {"TALLY_CLICKHOUSE_URL": server.url, "TALLY_CLICKHOUSE_DATABASE": DATABASE}
        topology = ["--store", "server", "--workers", str(WORKERS), "--sinks", "1"]
        pipeline = Pipeline(
            prefix="freshness_replicas",
            topic=f"{name}.events",
            command=python_module("deploy.cli", "up", *topology, "--api-replicas", str(REPLICAS)),
            settings=up_settings(bootstrap, workdir, name, port, store),
            bases=[f"http://127.0.0.1:{port + i}" for i in range(REPLICAS)],
            counted=lambda: stored_events(server.url),
            others=(server.pid,) if server.pid is not None else (),
        )
        return measure(bootstrap, workdir, scale, pipeline)
