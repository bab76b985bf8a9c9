"""API benchmark: `GET /api/v1/account/usage` under wrk, against a bare FastAPI endpoint.

Setup (not timed): a store with N accounts (100k at scale 1.0), one key each and a
week of per-minute rollups per account, written in bulk straight through the store
classes in a child process (the embedded store admits one process per data path,
and the caller may hold another). Then:

- `tally api` (the real app factory, real uvicorn settings) as its own process,
  loaded by `wrk` (a separate process) whose Lua script rotates over every
  account's key, so each request authenticates and reads a different account;
- the same uvicorn settings serving a bare FastAPI JSON endpoint: the ceiling
  of the web stack alone on this machine (api_baseline_rps).

Figures: api_rps, api_p99_ms, api_p50_ms, api_baseline_rps, api_baseline_p99_ms,
api_errors (non-2xx answers and socket errors under load; must be 0), and
api_cpu_us_per_request (the API process's CPU time over the measured wrk run per
answer: steadier than rps on a shared machine).

`python -m benchmarks.api --scale 0.05 --profile` runs it standalone against a
local broker-free setup and, with --profile, records the API under load with
py-spy (top functions printed, flame graph in the workdir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from benchmarks._procs import (
    Child,
    child_env,
    cpu_seconds,
    python_module,
    rss_mib,
    run_wrk,
    running,
    wait_http,
)

FULL_ACCOUNTS = 100_000
MIN_ACCOUNTS = 2_000
ROWS_PER_ACCOUNT = 12
"""Rollup minutes per account this week: a light but realistic history."""
CONNECTIONS = 16
"""Concurrent connections wrk keeps open (closed loop). With one API process,
latency is about CONNECTIONS / rate; 16 keeps a 2,000 rps API under 10 ms mean."""
WRK_THREADS = 1
FULL_DURATION_S = 30.0
MIN_DURATION_S = 8.0
WARMUP_S = 3.0
EVENTS_TOPIC = "tally.events"
DATABASE = "tally"
PARTITIONS = 8

USAGE_PATH = "/api/v1/account/usage"
BASELINE_PATH = "/bare"

_WRK_SCRIPT = """
local keys = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do keys[#keys + 1] = line end
  math.randomseed(os.time() + (tonumber(args[2]) or 0))
  i = math.random(#keys)
end
function request()
  i = i % #keys + 1
  return wrk.format("GET", wrk.path, {["X-API-Key"] = keys[i]})
end
"""


# -- seeding (runs in a child process: it opens the store) ----------------------------


if TYPE_CHECKING:
    from schemas.store import Store


def seed_accounts(store: Store, plans: dict[str, str], now: datetime, version: int) -> list[str]:
    """Accounts on their plans, each with a fresh key (returned in the same order).

    `version` is the rows' ReplacingMergeTree version, a nanosecond clock as
    `AccountStore` writes it: a server store's replicas re-read rows of the last
    30 s of versions on every poll (query_api/view_feed.py), so it says whether the
    accounts count as just written.
    """
    from query_api.keys import hash_key, new_key

    store.insert(
        "accounts",
        [[a, plan, 1, now, now, version] for a, plan in plans.items()],
        ["id", "plan", "billing_anchor_day", "created_at", "updated_at", "version"],
    )
    keys: list[str] = []
    key_rows: list[list[object]] = []
    for a in plans:
        key, prefix = new_key()
        keys.append(key)
        key_rows.append([prefix, hash_key(key), a, False, now, None, version])
    store.insert(
        "api_keys",
        key_rows,
        ["prefix", "key_hash", "account", "is_admin", "created_at", "revoked_at", "version"],
    )
    return keys


def seed(url: str, database: str, accounts: int, keys_file: pathlib.Path) -> None:
    import orjson

    from query_api.view_feed import OVERLAP_NS
    from schemas.events import REQUEST, STREAM_OPENED
    from schemas.rollup_table import COLUMNS, RollupStore, offset_markers
    from schemas.store import Store

    store = Store(url, database)
    store.migrate()
    rng = random.Random(5)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week_start = today - timedelta(days=today.weekday())
    span_min = max(1, int((now - week_start).total_seconds() // 60))
    plans = ("free", "pro", "max")
    ids = [f"bench-{i:07d}" for i in range(accounts)]
    # Written before the measured window, as a deployment's accounts mostly are: a
    # server store's replicas then poll none of them again (see seed_accounts).
    made = time.time_ns() - 2 * OVERLAP_NS
    keys = seed_accounts(store, {a: plans[i % 3] for i, a in enumerate(ids)}, now, made)
    batch: list[list[object]] = []
    for i, a in enumerate(ids):
        for _ in range(ROWS_PER_ACCOUNT):
            minute = week_start + timedelta(minutes=rng.randrange(span_min))
            events = rng.randint(1, 40)
            batch.append(
                [a, minute, REQUEST, "/v1/messages", "POST", "small-1", 200, "", events,
                 events * 1_000_000, 120.0 * events, 300 * events, 900 * events, minute, 0]
            )  # fmt: skip
        if i % 10 == 0:  # some accounts have a stream open right now
            batch.append(
                [a, now.replace(second=0, microsecond=0), STREAM_OPENED, "/v1/messages", "", "",
                 0, f"s-{i}", 1, 0, 0.0, 0, 0, now, 0]
            )  # fmt: skip
        if len(batch) >= 200_000:
            store.insert("rollup_minute", batch, COLUMNS)
            batch = []
    # Freshness markers, as the sink writes them: every partition counted up to now.
    store.insert("rollup_minute", batch, COLUMNS)
    partitions = range(PARTITIONS)
    now_ms = int(now.timestamp() * 1000)
    markers = offset_markers(
        EVENTS_TOPIC, dict.fromkeys(partitions, 1), dict.fromkeys(partitions, now_ms)
    )
    RollupStore(store).write_json(orjson.dumps(markers)[1:-1], len(markers))
    # A long-running deployment has its parts merged; a freshly bulk-loaded one
    # would make every FINAL read pay for dozens of parts the benchmark created.
    for table in ("accounts", "api_keys", "rollup_minute"):
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    store.close()
    keys_file.write_text("\n".join(keys) + "\n", encoding="ascii")


# -- the bare endpoint (the web stack's ceiling) -------------------------------------


def serve_baseline(host: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    body = {
        "data": {
            "requests": {"today": 342, "this_week": 2105, "this_month": 14523},
            "streams": {"active": 2, "max": 10},
        },
        "meta": {"updated_at": "2026-02-08T14:50:00.123Z"},
    }

    @app.get(BASELINE_PATH)
    async def bare() -> dict[str, Any]:
        return body

    # Exactly the uvicorn call of `tally api` (deploy/cli.py).
    uvicorn.run(app, host=host, port=port, log_level="warning")


# -- driving the load -----------------------------------------------------------------


def wrk(
    url: str, keys_file: pathlib.Path, duration_s: float, workdir: pathlib.Path
) -> dict[str, float]:
    args = [
        f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(duration_s))}s",
        "--timeout", "5s", url, "--", str(keys_file), "0",
    ]  # fmt: skip
    return run_wrk(workdir / "rotate_keys.lua", _WRK_SCRIPT, args, duration_s)


def _figures(prefix: str, result: dict[str, float]) -> dict[str, float]:
    seconds = result["duration_us"] / 1e6
    return {
        f"{prefix}_rps": round(result["requests"] / seconds, 1),
        f"{prefix}_p50_ms": round(result["p50_us"] / 1000, 2),
        f"{prefix}_p99_ms": round(result["p99_us"] / 1000, 2),
        f"{prefix}_errors": float(result["status_errors"] + result["socket_errors"]),
    }


def durations(scale: float) -> float:
    return max(MIN_DURATION_S, FULL_DURATION_S * min(scale, 1.0))


def seed_store(url: str, accounts: int, keys_file: pathlib.Path) -> float:
    """`seed` in a child process (the embedded store admits one process per data path);
    the seconds it took."""
    started = time.monotonic()
    subprocess.run(
        python_module(
            "benchmarks.api", "seed", "--url", url, "--database", DATABASE,
            "--accounts", str(accounts), "--keys", str(keys_file),
        ),
        env=child_env({}), check=True, timeout=1800,
    )  # fmt: skip
    return round(time.monotonic() - started, 1)


def api_env(url: str, port: int, workdir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment of a measured `tally api` on the store at `url`."""
    return child_env(
        {
            "TALLY_CLICKHOUSE_URL": url,
            "TALLY_CLICKHOUSE_DATABASE": DATABASE,
            "TALLY_API_PORT": str(port),
            "TALLY_DATA_DIR": str(workdir / "data"),
            # off: the store read per request, to compare with the in-memory view.
            "TALLY_API_USAGE_VIEW": os.environ.get("TALLY_BENCH_API_USAGE_VIEW", "auto"),
            **extra,
        }
    )


@contextlib.contextmanager
def serving_api(
    env: dict[str, str], keys_file: pathlib.Path, workdir: pathlib.Path
) -> Iterator[tuple[Child, str]]:
    """`tally api` running, answering and warmed up by wrk: the process and its usage URL."""
    log = workdir / "api.log"
    with running("tally api", python_module("deploy.cli", "api"), env, log) as api:
        base = f"http://127.0.0.1:{env['TALLY_API_PORT']}"
        wait_http(f"{base}/healthz", api)
        wrk(f"{base}{USAGE_PATH}", keys_file, WARMUP_S, workdir)
        api.check()
        yield api, f"{base}{USAGE_PATH}"


def measure_usage(
    api: Child, url: str, keys_file: pathlib.Path, seconds: float, workdir: pathlib.Path,
    prefix: str,
) -> dict[str, float]:  # fmt: skip
    """One wrk run against a serving API: `<prefix>_rps`, `_p50_ms`, `_p99_ms`, `_errors`,
    `_cpu_us_per_request`, `_rss_mib`."""
    cpu_before = cpu_seconds(api.pid)
    loaded = wrk(url, keys_file, seconds, workdir)
    cpu_used = cpu_seconds(api.pid) - cpu_before
    figures = _figures(prefix, loaded)
    # CPU per answer: steadier than rps on a shared machine (wall clock counts
    # whatever else runs; this counts only the API process's own work).
    per_request = cpu_used * 1e6 / max(1.0, loaded["requests"])
    figures[f"{prefix}_cpu_us_per_request"] = round(per_request, 1)
    api.check()
    figures[f"{prefix}_rss_mib"] = rss_mib(api.pid)[0]
    return figures


def accounts_for(scale: float) -> int:
    return max(MIN_ACCOUNTS, int(FULL_ACCOUNTS * scale))


def run(
    bootstrap: str, workdir: pathlib.Path, scale: float, profile_s: float = 0.0
) -> dict[str, float]:
    """The API needs no Kafka: `bootstrap` is unused (the shared bench signature)."""
    del bootstrap
    from deploy.processes import free_port

    workdir = pathlib.Path(workdir) / "api"
    workdir.mkdir(parents=True, exist_ok=True)
    accounts = accounts_for(scale)
    url = f"chdb://{(workdir / 'clickhouse').resolve()}"
    keys_file = workdir / "keys.txt"
    seeded_s = seed_store(url, accounts, keys_file)
    duration = durations(scale)
    figures: dict[str, float] = {"api_accounts": float(accounts), "api_seed_s": seeded_s}
    env = api_env(url, free_port(), workdir)
    with serving_api(env, keys_file, workdir) as (api, usage):
        if profile_s > 0:
            _profile(api.pid, usage, keys_file, profile_s, workdir)
        figures.update(measure_usage(api, usage, keys_file, duration, workdir, "api"))

    port = free_port()
    args = python_module("benchmarks.api", "serve-baseline", "--port", str(port))
    with running("bare FastAPI", args, child_env({}), workdir / "baseline.log") as bare:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}{BASELINE_PATH}", bare)
        wrk(f"{base}{BASELINE_PATH}", keys_file, WARMUP_S, workdir)
        found = _figures(
            "api_baseline", wrk(f"{base}{BASELINE_PATH}", keys_file, duration, workdir)
        )
        bare.check()
    figures.update(found)
    figures["api_vs_baseline"] = round(figures["api_rps"] / figures["api_baseline_rps"], 3)
    return figures


def _profile(
    pid: int, url: str, keys_file: pathlib.Path, seconds: float, workdir: pathlib.Path
) -> None:
    """py-spy on the API while wrk loads it: a flame graph and the top frames."""
    spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
    raw = workdir / "api-profile.txt"
    recorder = subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
         "--format", "raw", "-o", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wrk(url, keys_file, seconds + 2, workdir)
    finally:
        recorder.wait(timeout=60)
    print(summarize_profile(raw))


def summarize_profile(raw: pathlib.Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")
        ]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples; by own time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("by inclusive time:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api")
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("seed")
    s.add_argument("--url", required=True)
    s.add_argument("--database", required=True)
    s.add_argument("--accounts", type=int, required=True)
    s.add_argument("--keys", type=pathlib.Path, required=True)
    b = sub.add_parser("serve-baseline")
    b.add_argument("--port", type=int, required=True)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy seconds under load")
    args = parser.parse_args()
    if args.command == "seed":
        seed(args.url, args.database, args.accounts, args.keys)
    elif args.command == "serve-baseline":
        serve_baseline("127.0.0.1", args.port)
    else:
        with tempfile.TemporaryDirectory(prefix="tally-bench-api-") as tmp:
            print(json.dumps(run("", pathlib.Path(tmp), args.scale, args.profile), indent=2))


if __name__ == "__main__":
    main()
