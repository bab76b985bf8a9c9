"""API replica benchmark: `tally api` against a ClickHouse server, side by side with `api`.

The same load as benchmarks/api.py (its seed, its wrk script rotating over every
account's key, its durations), but the store is a ClickHouse server
(deploy/clickhouse_local.py, started here on a free port) and the API is one replica
of the production topology: its usage view loaded from a snapshot of the server and
then following a `tally.rollups` topic of its own on the bench's broker
(query_api/view_feed.py; no deltas flow during the run, so what is measured is the
answers, the feed's idle fetches and the accounts/keys poll the embedded store does not
run).

The poll re-reads, every 0.25 s, the accounts and keys whose version lies within 30 s
of the newest version the replica holds (`OVERLAP_NS`). The seed's accounts carry a
version from before the run and one account is written after the seed, as a
deployment's later admin write would be, so the headline figures see a poll that
finds almost nothing. Then:

- `api_replica_after_bulk_*`: N further accounts (as many as the seed's) with fresh
  keys are written in bulk while the replica serves, and wrk runs again at once: every
  poll now re-reads all of them (and their keys) until an account or key is written at
  least 30 s of versions later; with no later write that lasts indefinitely;
- `api_replica_settled_*`: one account written after that window, and wrk
  again: the poll finds almost nothing again.

Figures: api_replica_rps, api_replica_p99_ms, api_replica_p50_ms, api_replica_errors,
api_replica_cpu_us_per_request, api_replica_rss_mib, the same under the two prefixes
above, api_replica_p99_after_bulk_ms (= api_replica_after_bulk_p99_ms, the name the
issue uses), api_replica_accounts, api_replica_seed_s, api_replica_bulk_s (the bulk
write's time); run.py adds api_replica_vs_embedded (api_replica_rps / api_rps, the
embedded figure of the same run) and api_replica_cpu_vs_embedded (CPU per request, the
steadier comparison on a shared machine).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from datetime import UTC, datetime

from benchmarks._procs import clickhouse_server
from benchmarks.api import (
    DATABASE,
    EVENTS_TOPIC,
    PARTITIONS,
    accounts_for,
    api_env,
    durations,
    measure_usage,
    seed_accounts,
    seed_store,
    serving_api,
)

PREFIX = "api_replica"


def write_accounts(url: str, prefix: str, count: int) -> int:
    """`count` accounts with a key each, written now as one bulk load (two INSERTs) with
    the clock's version, as `AccountStore` versions a write; that version."""
    from schemas.store import Store

    store = Store(url, DATABASE)
    try:
        version = time.time_ns()
        plans = {f"{prefix}-{i:07d}": "pro" for i in range(count)}
        seed_accounts(store, plans, datetime.now(UTC), version)
    finally:
        store.close()
    return version


def run(bootstrap: str, workdir: pathlib.Path, scale: float) -> dict[str, float]:
    from deploy.kafka_local import ensure_topics
    from deploy.processes import free_port
    from query_api.view_feed import OVERLAP_NS

    workdir = pathlib.Path(workdir) / "api_replica"
    workdir.mkdir(parents=True, exist_ok=True)
    accounts = accounts_for(scale)
    duration = durations(scale)
    rollups = f"bench-replica-{uuid.uuid4().hex[:8]}.rollups"
    asyncio.run(ensure_topics(bootstrap, {rollups: PARTITIONS}))
    keys_file = workdir / "keys.txt"
    with clickhouse_server(workdir) as server:
        figures = {
            f"{PREFIX}_accounts": float(accounts),
            f"{PREFIX}_seed_s": seed_store(server.url, accounts, keys_file),
        }
        write_accounts(server.url, "later", 1)
        env = api_env(
            server.url, free_port(), workdir,
            TALLY_KAFKA_BOOTSTRAP=bootstrap, TALLY_EVENTS_TOPIC=EVENTS_TOPIC,
            TALLY_ROLLUPS_TOPIC=rollups,
        )  # fmt: skip
        with serving_api(env, keys_file, workdir) as (api, usage):
            figures.update(measure_usage(api, usage, keys_file, duration, workdir, PREFIX))
            started = time.monotonic()
            bulk_version = write_accounts(server.url, "bulk", accounts)
            figures[f"{PREFIX}_bulk_s"] = round(time.monotonic() - started, 1)
            after = f"{PREFIX}_after_bulk"
            figures.update(measure_usage(api, usage, keys_file, duration, workdir, after))
            figures[f"{PREFIX}_p99_after_bulk_ms"] = figures[f"{after}_p99_ms"]
            # A later write moves the poll's window past the bulk only once its version
            # is OVERLAP_NS beyond the bulk's.
            time.sleep(max(0.0, (bulk_version + OVERLAP_NS - time.time_ns()) / 1e9 + 0.1))
            write_accounts(server.url, "later-again", 1)
            time.sleep(1.0)  # a few polls: the replica holds the new newest version
            settled = f"{PREFIX}_settled"
            figures.update(measure_usage(api, usage, keys_file, duration, workdir, settled))
    return figures
