"""API benchmark under abuse: a well-behaved client's latency, quiet and with 8
abusive clients at the same API process (issue 16).

Setup (not timed): a store with GOOD_ACCOUNTS accounts (one key each, a few rollup
minutes) and one "heavy" account with HEAVY_DAYS of per-minute rollups over
HEAVY_ROUTES routes, seeded in a child process; `tally api` with its default
settings as its own process.

The well-behaved client (this process, one keep-alive connection) asks
`GET /api/v1/account/usage` GOOD_RPS times a second, rotating over the good keys
(each well inside its own rate limit), for `duration` seconds alone (its quiet
p99) and `duration` seconds while a child process runs ABUSERS threads at the API,
in ROUNDS alternations so that a shared machine's background load weighs on both:

- 2 send oversized bodies (a chunked POST of 8 MiB to an admin route, no key);
- 3 guess keys (well-formed, unknown) as fast as answers come;
- 3 ask for maximal analytics series with the heavy account's key: window=minute,
  group_by=route, over ranges of just under and well over the row bound.

Figures: api_quiet_p99_ms, api_p99_under_abuse_ms, api_abuse_p99_ratio (target
<= 3), api_abuse_good_errors (non-200 answers to the well-behaved client; must be
0) and the abusers' answers by status (api_abuse_status_<code>).

`python -m benchmarks.abuse --scale 0.05` runs it standalone. To see what costs what:
BENCH_ABUSE_ONLY=oversized|guesser|analyst keeps one kind of abuser, and
BENCH_ABUSE_API_ENV='{"TALLY_ANALYTICS_ROWS_PER_TOKEN": "50"}' tries API settings.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from benchmarks._procs import Child, child_env, python_module, running, wait_http

GOOD_ACCOUNTS = 50
GOOD_RPS = 100.0
HEAVY_ACCOUNT = "heavy"
HEAVY_DAYS = 3
HEAVY_ROUTES = 12
ABUSERS = 8
ROUNDS = 4
ABUSE_RAMP_S = 1.0
FULL_DURATION_S = 20.0
MIN_DURATION_S = 8.0
USAGE_PATH = "/api/v1/account/usage"
ANALYTICS_PATH = "/api/v1/analytics/usage"


# -- seeding (a child process: it opens the store) ---------------------------------------


def seed(url: str, database: str, keys_file: pathlib.Path) -> None:
    import orjson

    from benchmarks.api import seed_accounts
    from schemas.events import REQUEST
    from schemas.rollup_table import COLUMNS, RollupStore, offset_markers
    from schemas.store import Store

    store = Store(url, database)
    store.migrate()
    now = datetime.now(UTC)
    ids = [f"good-{i:03d}" for i in range(GOOD_ACCOUNTS)] + [HEAVY_ACCOUNT]
    keys = seed_accounts(store, dict.fromkeys(ids, "pro"), now, time.time_ns())
    rng = random.Random(16)
    this_minute = now.replace(second=0, microsecond=0)
    rows: list[list[object]] = []
    for a in ids[:-1]:
        for _ in range(10):
            minute = this_minute - timedelta(minutes=rng.randrange(600))
            rows.append(
                [a, minute, REQUEST, "/v1/messages", "POST", "small-1", 200, "", 3,
                 3_000_000, 360.0, 900, 2700, minute, 0]
            )  # fmt: skip
    for m in range(HEAVY_DAYS * 1440):
        minute = this_minute - timedelta(minutes=m)
        for r in range(HEAVY_ROUTES):
            rows.append(
                [HEAVY_ACCOUNT, minute, REQUEST, f"/v1/route-{r}", "POST", "large-1", 200, "",
                 2, 2_000_000, 240.0, 600, 1800, minute, 0]
            )  # fmt: skip
    store.insert("rollup_minute", rows, COLUMNS)
    markers = offset_markers("tally.events", {0: 1}, {0: int(now.timestamp() * 1000)})
    RollupStore(store).write_json(orjson.dumps(markers)[1:-1], len(markers))
    for table in ("accounts", "api_keys", "rollup_minute"):
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    store.close()
    keys_file.write_text("\n".join(keys) + "\n", encoding="ascii")


# -- the abusers (a child process, so their work does not slow the measuring client) ----


def _oversized(host: str, port: int, until: float, statuses: Counter[str]) -> None:
    chunk = b" " * 65536
    while time.monotonic() < until:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.putrequest("POST", "/api/v1/admin/accounts")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for _ in range(128):  # 8 MiB
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
            statuses[str(conn.getresponse().status)] += 1
        except OSError:
            statuses["reset"] += 1  # the server answered 413 and stopped reading
        finally:
            conn.close()


def _get(
    conn: http.client.HTTPConnection, path: str, key: str, statuses: Counter[str]
) -> http.client.HTTPConnection:
    """One GET, its status counted; the connection to go on with (a new one after a reset)."""
    try:
        conn.request("GET", path, headers={"X-API-Key": key})
        response = conn.getresponse()
        response.read()
        statuses[str(response.status)] += 1
        return conn
    except OSError:
        statuses["reset"] += 1
        conn.close()
        return http.client.HTTPConnection(conn.host, conn.port, timeout=conn.timeout)


def _guesser(host: str, port: int, until: float, statuses: Counter[str]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    rng = random.Random()
    while time.monotonic() < until:
        key = f"tly_{rng.getrandbits(48):012x}_" + "G" * 32
        conn = _get(conn, USAGE_PATH, key, statuses)


def _analyst(host: str, port: int, key: str, until: float, statuses: Counter[str]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    now = datetime.now(UTC)
    # Just under the default 10,000-row bound (13 h x 12 routes = 9,360 rows), and the
    # whole history (over it: refused after the scan).
    spans = [timedelta(hours=13), timedelta(days=HEAVY_DAYS)]
    i = 0
    while time.monotonic() < until:
        since = (now - spans[i % 2]).strftime("%Y-%m-%dT%H:%M:%SZ")
        i += 1
        path = (
            f"{ANALYTICS_PATH}?window=minute&group_by=route&from={since}"
            f"&to={now.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
        conn = _get(conn, path, key, statuses)


ABUSE_MIX = ("oversized", "oversized", "guesser", "guesser", "guesser") + ("analyst",) * (
    ABUSERS - 5
)


def abuse(port: int, heavy_key: str, seconds: float, out: pathlib.Path) -> None:
    """ABUSERS threads of ABUSE_MIX until `seconds` have passed; their answers' statuses
    counted into `out`. BENCH_ABUSE_ONLY=<kind> keeps one kind (to see what costs what)."""
    host = "127.0.0.1"
    until = time.monotonic() + seconds
    only = os.environ.get("BENCH_ABUSE_ONLY")
    kinds = [k for k in ABUSE_MIX if not only or k == only]
    # One counter per thread (no shared read-modify-write), summed at the end.
    counters = [Counter[str]() for _ in kinds]
    threads = []
    for kind, counter in zip(kinds, counters, strict=True):
        if kind == "oversized":
            threads.append(threading.Thread(target=_oversized, args=(host, port, until, counter)))
        elif kind == "guesser":
            threads.append(threading.Thread(target=_guesser, args=(host, port, until, counter)))
        else:
            threads.append(
                threading.Thread(target=_analyst, args=(host, port, heavy_key, until, counter))
            )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.write_text(json.dumps(dict(sum(counters, Counter[str]()))), encoding="utf-8")


# -- the well-behaved client -----------------------------------------------------------


def measure(port: int, keys: list[str], seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of paced usage requests, and how many were not 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    errors = 0
    interval = 1.0 / GOOD_RPS
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        wait = start + n * interval - now
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        conn.request("GET", USAGE_PATH, headers={"X-API-Key": keys[n % len(keys)]})
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - t0) * 1000)
        errors += response.status != 200
        n += 1
    conn.close()
    return latencies, errors


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def run(bootstrap: str, workdir: pathlib.Path, scale: float) -> dict[str, float]:
    """The API needs no Kafka: `bootstrap` is unused (the shared bench signature)."""
    del bootstrap
    from deploy.processes import free_port

    workdir = pathlib.Path(workdir) / "abuse"
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"chdb://{(workdir / 'clickhouse').resolve()}"
    keys_file = workdir / "keys.txt"
    subprocess.run(
        python_module(
            "benchmarks.abuse", "seed", "--url", url, "--database", "tally",
            "--keys", str(keys_file),
        ),
        env=child_env({}), check=True, timeout=900,
    )  # fmt: skip
    keys = keys_file.read_text(encoding="ascii").split()
    good, heavy = keys[:-1], keys[-1]
    duration = max(MIN_DURATION_S, FULL_DURATION_S * min(scale, 1.0))
    port = free_port()
    env = child_env(
        {
            "TALLY_CLICKHOUSE_URL": url,
            "TALLY_CLICKHOUSE_DATABASE": "tally",
            "TALLY_API_PORT": str(port),
            "TALLY_DATA_DIR": str(workdir / "data"),
            # Diagnosis: settings to try on the API, as a JSON object of TALLY_* values.
            **json.loads(os.environ.get("BENCH_ABUSE_API_ENV", "{}")),
        }
    )
    with running("tally api", python_module("deploy.cli", "api"), env, workdir / "api.log") as api:
        wait_http(f"http://127.0.0.1:{port}/healthz", api)
        measure(port, good, 2.0)  # warm-up
        phases = _rounds(api, port, good, heavy, duration, workdir)
    figures: dict[str, float] = {
        "api_quiet_p99_ms": round(p99(phases.quiet), 2),
        "api_p99_under_abuse_ms": round(p99(phases.loaded), 2),
    }
    figures["api_abuse_p99_ratio"] = round(
        figures["api_p99_under_abuse_ms"] / figures["api_quiet_p99_ms"], 2
    )
    figures["api_abuse_good_requests"] = float(len(phases.quiet) + len(phases.loaded))
    figures["api_abuse_good_errors"] = float(phases.errors)
    for status, count in sorted(phases.abusers.items()):
        figures[f"api_abuse_status_{status}"] = float(count)
    return figures


@dataclass
class Phases:
    quiet: list[float] = field(default_factory=list)
    """The well-behaved client's latencies (ms) alone."""
    loaded: list[float] = field(default_factory=list)
    """Its latencies while the abusers run."""
    errors: int = 0
    """Its answers that were not 200, in either phase."""
    abusers: Counter[str] = field(default_factory=Counter)
    """The abusers' answers, by status."""


def _rounds(
    api: Child, port: int, good: list[str], heavy: str, duration: float, workdir: pathlib.Path
) -> Phases:
    """ROUNDS alternations of quiet and abused measurement, each a ROUNDS-th of
    `duration`: on a shared machine, background load then weighs on both phases alike
    rather than on whichever ran while a neighbour was busy."""
    phases = Phases()
    share = duration / ROUNDS
    for i in range(ROUNDS):
        latencies, errors = measure(port, good, share)
        phases.quiet += latencies
        phases.errors += errors
        report = workdir / f"abusers-{i}.json"
        args = python_module(
            "benchmarks.abuse", "abuse", "--port", str(port), "--key", heavy,
            "--seconds", str(share + ABUSE_RAMP_S), "--out", str(report),
        )  # fmt: skip
        with running("abusers", args, child_env({}), workdir / "abusers.log") as abusers:
            time.sleep(ABUSE_RAMP_S)  # the child starts and its abuse builds up
            latencies, errors = measure(port, good, share)
            phases.loaded += latencies
            phases.errors += errors
            deadline = time.monotonic() + 30
            while abusers.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        api.check()
        if report.exists():
            phases.abusers.update(json.loads(report.read_text(encoding="utf-8")))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse")
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("seed")
    s.add_argument("--url", required=True)
    s.add_argument("--database", required=True)
    s.add_argument("--keys", type=pathlib.Path, required=True)
    a = sub.add_parser("abuse")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--key", required=True)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--scale", type=float, default=0.05)
    args = parser.parse_args()
    if args.command == "seed":
        seed(args.url, args.database, args.keys)
    elif args.command == "abuse":
        abuse(args.port, args.key, args.seconds, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="tally-bench-abuse-") as tmp:
            print(json.dumps(run("", pathlib.Path(tmp), args.scale), indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
