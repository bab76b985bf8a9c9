"""Memory of an API replica's usage view (query_api/view.py) at 100k and 1M active accounts.

    .venv/bin/python -m benchmarks.view_memory [--accounts 100000,1000000]

For each size a fresh interpreter (so one size's heap does not inflate the next's)
builds the view as a replica holds it: every account with its row, one API key, and
MINUTES (account, minute) rows of usage this week, applied as the feed applies deltas
(`UsageView.apply`). It reports the resident set (VmRSS) of the process before and
after, for 1 minute and for 1 + EXTRA_MINUTES minutes per account, so that

- bytes per (account, minute) = the RSS the extra minutes add / (accounts x EXTRA_MINUTES),
- bytes per account = (RSS with 1 minute - the empty interpreter) / accounts, minus one
  minute's bytes: the account row, its key and its per-account arrays.

Figures: view_rss_<n>_mib (1 + EXTRA_MINUTES minutes per account, the view alone:
the process's RSS minus the interpreter's before building it), view_bytes_per_minute_row,
view_bytes_per_account. No Kafka or store is needed (the bench runner's broker
is not used). Loading from a store streams the snapshot a block at a time
(`Store.query_blocks`), which these figures do not include.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

MINUTES = 6
EXTRA_MINUTES = MINUTES - 1
SIZES = (100_000, 1_000_000)
CHUNK = 50_000


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _build(accounts: int, minutes: int) -> dict[str, int]:
    """In this process: the view with `accounts` accounts of `minutes` minutes each."""
    import gc

    from query_api.keys import hash_key, new_key
    from query_api.view import UsageView
    from query_api.view_rows import AccountChange, KeyChange
    from schemas.events import REQUEST

    now = datetime.now(UTC)
    before = _rss_bytes()
    view = UsageView(
        "e", timedelta(days=42), timedelta(seconds=900), 100 * accounts * minutes, lambda: now
    )
    view.loaded = True  # an empty store: everything arrives as polls and deltas do
    first = int(now.timestamp()) // 60 * 60 - 3_600 * 24
    for start in range(0, accounts, CHUNK):
        ids = [f"acct-{i:08d}" for i in range(start, min(accounts, start + CHUNK))]
        view.sync_accounts([AccountChange(a, "pro", 1, now, 1) for a in ids])
        changes = []
        for account in ids:
            key, prefix = new_key()
            changes.append(KeyChange(prefix, hash_key(key), account, False, False, 1))
        view.sync_keys(changes)
        for m in range(minutes):
            minute = first + 60 * m * 7
            rows: list[list[Any]] = [
                [a, minute, REQUEST, "", "", "", 200, "", 3, 3_000_000, 0.0, 0, 0, minute * 1000]
                for a in ids
            ]
            view.apply(rows, {0: minute * 1000})
    gc.collect()
    if not view.active or view.rows != accounts * minutes:
        raise RuntimeError(f"the view holds {view.rows} rows (active: {view.active})")
    return {"before": before, "after": _rss_bytes(), "rows": view.rows}


def _child(accounts: int, minutes: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.view_memory", "--child", f"{accounts},{minutes}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return figures


def measure(sizes: tuple[int, ...] = SIZES) -> dict[str, float]:
    figures: dict[str, float] = {}
    for accounts in sizes:
        one = _child(accounts, 1)
        full = _child(accounts, MINUTES)
        per_minute = (full["after"] - one["after"]) / (accounts * EXTRA_MINUTES)
        per_account = (one["after"] - one["before"]) / accounts - per_minute
        label = f"{accounts // 1000}k" if accounts < 1_000_000 else f"{accounts // 1_000_000}m"
        figures[f"view_rss_{label}_mib"] = round((full["after"] - full["before"]) / 2**20, 1)
        figures[f"view_process_rss_{label}_mib"] = round(full["after"] / 2**20, 1)
        figures[f"view_bytes_per_minute_row_{label}"] = round(per_minute, 1)
        figures[f"view_bytes_per_account_{label}"] = round(per_account, 1)
    return figures


def run(bootstrap: str, workdir: Path, scale: float) -> dict[str, float]:
    """benchmarks/run.py's entry: the full sizes whatever the scale (no broker needed)."""
    return measure()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.view_memory")
    parser.add_argument("--accounts", default=",".join(str(n) for n in SIZES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        accounts, minutes = (int(x) for x in args.child.split(","))
        print(json.dumps(_build(accounts, minutes)))
        return
    sizes = tuple(int(n) for n in args.accounts.split(","))
    print(json.dumps(measure(sizes), indent=2))


if __name__ == "__main__":
    main()
