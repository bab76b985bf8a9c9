"""`tally reconcile --from T --to T`: recount usage from the Kafka log, compare with the rollups.

What it does, in order:

1. Captures the end offset of every partition of the events topic
   (TALLY_EVENTS_TOPIC at TALLY_KAFKA_BOOTSTRAP).
2. Reads the per-account rollup totals of the minutes in the range, and in the same
   query the offsets the worker has counted up to (its offset markers), either from
   the store directly or, when the admin API answers at TALLY_API_URL and an admin
   key is set, through `GET /api/v1/admin/totals` (the embedded store admits one
   process, so a running stack can only be asked through its API).
3. Reads every partition with a group-less, manually assigned consumer, from the
   beginning (or from `--since-publish`) up to the offset the worker has counted
   to, and recounts the range with the worker's own validation and a whole-scan
   deduplication (processors/reconcile.py says exactly how).
4. Prints the accounts whose totals differ, or one "no drift" line.

Why stop at the worker's counted offsets rather than at the end of the log: the
rollup deltas and the events offsets they cover are written in one INSERT (the
offset markers of processors/rollup.py), so the rollups reflect exactly the
messages below them. Comparing the same messages on both sides keeps a
worker that is merely behind (or still running) from looking like drift; what it
has not counted yet is reported on stderr, not compared. When the store holds no
offsets for the topic, the end offsets of step 1 are used instead, and events the
worker has not reached show up as drift (said on stderr).

Exit codes: 0 no drift; 1 drift in at least one account; 2 could not check
(Kafka, the store or the API unavailable, a bad argument), with one line saying
what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from deploy.admin_backend import DEFAULT_API_URL
from deploy.admin_cli import account_id
from deploy.exceptions import ReconcileError
from deploy.reconcile_report import as_json, as_text
from deploy.reconcile_scan import check_range, reconcile
from deploy.reconcile_source import TotalsSource, choose_source
from schemas.windows import format_time

if TYPE_CHECKING:
    from processors import WorkerSettings

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_ERROR = 2

TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(2100, 1, 1, tzinfo=UTC)


async def run_reconcile(
    settings: WorkerSettings,
    start: datetime,
    end: datetime,
    source: TotalsSource,
    *,
    account: str | None = None,
    since_publish: datetime | None = None,
    json_output: bool = False,
    progress: bool = True,
    out: TextIO,
    err: TextIO,
) -> int:
    """The whole command once the rollup source is chosen: its exit code."""
    try:
        outcome = await reconcile(
            bootstrap=settings.bootstrap,
            topic=settings.events_topic,
            limits=settings.limits(),
            start=start,
            end=end,
            source=source,
            account=account,
            since_publish=since_publish,
            err=err if progress else None,
        )
    except ReconcileError as exc:
        print(f"tally: {exc.message}", file=err)
        return EXIT_ERROR
    for warning in outcome.warnings:
        print(f"tally: warning: {warning}", file=err)
    if json_output:
        print(json.dumps(as_json(outcome), indent=2), file=out)
    else:
        print(as_text(outcome), file=out)
    return EXIT_OK if outcome.report.ok else EXIT_DRIFT


def run(args: argparse.Namespace) -> int:
    from processors import WorkerSettings
    from schemas.settings import load

    settings = load(WorkerSettings)
    # aiokafka logs every failed connection attempt; the one-line error below says it
    # all, and a second, differently worded line would only confuse.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        check_range(args.from_, args.to)
        source, how = choose_source(args, os.environ)
    except ReconcileError as exc:
        print(f"tally: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(how, file=sys.stderr)
    try:
        return asyncio.run(
            run_reconcile(
                settings,
                args.from_,
                args.to,
                source,
                account=args.account,
                since_publish=args.since_publish,
                json_output=args.json,
                progress=not args.quiet,
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    finally:
        source.close()


# -- the parser ------------------------------------------------------------------------


def parse_time(value: str) -> datetime:
    """RFC 3339 with a zone, or `now`."""
    if value.strip().lower() == "now":
        return datetime.now(UTC)
    from pydantic import TypeAdapter, ValidationError

    from schemas.events import Rfc3339

    try:
        parsed: datetime = TypeAdapter(Rfc3339).validate_python(value.strip())
        parsed = parsed.astimezone(UTC)
    except (ValidationError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an RFC 3339 time with a zone, e.g. 2026-03-29T00:00:00Z"
        ) from None
    # The store's DateTime column spans 1970..2106; outside it nothing can be checked.
    if not TIME_MIN <= parsed < TIME_MAX:
        raise argparse.ArgumentTypeError(
            f"{value!r} is outside {format_time(TIME_MIN)} .. {format_time(TIME_MAX)}"
        )
    return parsed


DESCRIPTION = (
    "Recount per-account usage for [--from, --to) from the events retained in Kafka and "
    "compare it with the rollups. Rollups are per minute: the minutes whose start lies in "
    "the range are checked. Rollups are read through the admin API when it answers at "
    "TALLY_API_URL and TALLY_ADMIN_KEY is set, otherwise from the store directly. Exit "
    "status: 0 no drift, 1 drift, 2 could not check."
)


def register(sub: Any) -> None:
    """Add `reconcile` to the `tally` parser's subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "reconcile",
        help="recount usage from the Kafka log and compare it with the rollups",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--from",
        dest="from_",
        required=True,
        type=parse_time,
        metavar="T",
        help="range start, RFC 3339 with a zone (e.g. 2026-03-29T00:00:00Z) or `now`",
    )
    parser.add_argument(
        "--to",
        required=True,
        type=parse_time,
        metavar="T",
        help="range end, exclusive (RFC 3339 with a zone, or `now`)",
    )
    parser.add_argument("--account", type=account_id, metavar="ID", help="check this account only")
    parser.add_argument(
        "--since-publish",
        type=parse_time,
        metavar="T",
        help="read only messages published at or after T (Kafka record time) instead of "
        "the whole log. Under reconcile's rules an event in the range cannot come from a "
        "message published before --from minus the future allowance (5 min by default), "
        "so that far back loses nothing; earlier copies of re-sent events are then not "
        "seen for deduplication",
    )
    parser.add_argument(
        "--json", action="store_true", help="machine output: the whole report as JSON"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.add_argument(
        "--admin-key",
        metavar="KEY",
        help="admin key for the API (default $TALLY_ADMIN_KEY; prefer the variable)",
    )
    parser.add_argument(
        "--api-url",
        metavar="URL",
        help=f"the API to read rollups through (default $TALLY_API_URL or {DEFAULT_API_URL})",
    )
    parser.set_defaults(run=run)
