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
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from deploy.admin_backend import HttpBackend, api_answers
from deploy.admin_cli import DEFAULT_API_URL, account_id, table
from deploy.admin_store import StoreBackend, open_store_backend
from deploy.exceptions import AdminCliError, ReconcileError
from processors.decode import Limits
from processors.reconcile import (
    AccountTotals,
    DriftReport,
    Recount,
    RecountStats,
    align_range,
    compare,
    format_units,
)
from processors.windows import format_time

if TYPE_CHECKING:
    from processors.settings import WorkerSettings
    from schemas.store import Store

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_ERROR = 2

STALL_S = 30.0
"""No record for this long while offsets remain to be read: Kafka is not answering."""
KAFKA_TIMEOUT_S = 30.0
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(2100, 1, 1, tzinfo=UTC)


def limits_of(settings: WorkerSettings) -> Limits:
    """The worker's limits, built as processors/app.py builds them."""
    return Limits(
        max_message_bytes=settings.max_message_bytes,
        max_event_bytes=settings.max_event_bytes,
        max_future=timedelta(seconds=settings.max_future_s),
        max_lateness=timedelta(seconds=settings.max_lateness_s),
    )


# -- the rollup side: the store or the admin API ----------------------------------------


@dataclass(frozen=True)
class StoredView:
    accounts: dict[str, AccountTotals]
    counted_offsets: dict[int, int] | None
    """Per partition, the next offset not yet counted; None: no offsets stored."""


class TotalsSource(Protocol):
    @property
    def description(self) -> str: ...

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView: ...

    def close(self) -> None: ...


def view_of(doc: Mapping[str, Any], topic: str, since: datetime, until: datetime) -> StoredView:
    """Parse the admin API's totals body (both sources produce it)."""
    meta = doc["meta"]
    if meta["topic"] != topic:
        raise ReconcileError(
            f"the rollups answer for events topic {meta['topic']!r} but this check reads "
            f"{topic!r}; set TALLY_EVENTS_TOPIC to the topic the worker counts"
        )
    if (meta["minutes_from"], meta["minutes_to"]) != (format_time(since), format_time(until)):
        raise ReconcileError(
            f"the rollups were summed over {meta['minutes_from']}..{meta['minutes_to']}, not "
            f"{format_time(since)}..{format_time(until)}; the API runs another Tally version: "
            "upgrade it, or stop it and run this against the store"
        )
    accounts = {
        str(entry["account"]): AccountTotals(
            requests=int(entry["requests"]),
            units_micro=int(entry["units_micro"]),
            events={str(k): int(v) for k, v in entry["events"].items()},
        )
        for entry in doc["data"]
    }
    offsets = meta.get("counted_offsets")
    counted = None if offsets is None else {int(p): int(o) for p, o in offsets.items()}
    return StoredView(accounts, counted)


class StoreTotals:
    """The store, read in this process by the API's own operation."""

    def __init__(self, store: Store, owner: StoreBackend | None = None) -> None:
        self.store = store
        self._owner = owner

    @property
    def description(self) -> str:
        if self._owner is not None:
            return self._owner.description
        return f"the store directly (database {self.store.database})"

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView:
        from query_api.admin_ops import account_totals

        out = account_totals(self.store, topic, since, until, account)
        return view_of(out.model_dump(mode="json"), topic, since, until)

    def close(self) -> None:
        # Only a store this module opened is closed; a caller's store stays theirs.
        if self._owner is not None:
            self._owner.close()


class ApiTotals(HttpBackend):
    """`GET /api/v1/admin/totals` of a running stack, with the admin CLI's error handling."""

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView:
        params = {"from": format_time(since), "to": format_time(until)}
        if account is not None:
            params["account"] = account
        try:
            doc = self._call("GET", "/totals", params=params)
        except AdminCliError as exc:
            if exc.status == 404:
                raise ReconcileError(
                    f"the API at {self.api_url} has no /api/v1/admin/totals (an older Tally); "
                    "upgrade it, or stop it and run this against the store"
                ) from None
            raise ReconcileError(exc.message) from None
        return view_of(doc, topic, since, until)


StoreOpener = Callable[[str, bool], StoreBackend]


def choose_source(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    probe: Callable[[str], bool] = api_answers,
    open_store: StoreOpener = open_store_backend,
) -> tuple[TotalsSource, str]:
    """The admin API when it answers and an admin key is set, else the store (as the admin
    CLI decides); and a line for stderr saying which and why."""
    api_url = (args.api_url or environ.get("TALLY_API_URL") or DEFAULT_API_URL).rstrip("/")
    admin_key = args.admin_key or environ.get("TALLY_ADMIN_KEY") or None
    api_up = probe(api_url)
    if api_up and admin_key:
        return ApiTotals(api_url, admin_key), f"tally: reading rollups through the API at {api_url}"
    try:
        backend = open_store(api_url, api_up)
    except AdminCliError as exc:
        raise ReconcileError(exc.message) from None
    reason = (
        "the API answers but no admin key was given" if api_up else f"no API answers at {api_url}"
    )
    source = StoreTotals(backend.store, backend)
    return source, f"tally: reading rollups from {backend.description}: {reason}"


# -- the log side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionScan:
    partition: int
    log_start: int
    """The first offset Kafka still retains."""
    log_end: int
    """The end offset when the scan began."""
    start: int
    """First offset read."""
    stop: int
    """Offsets below this were read: the worker's counted offset (or `log_end`)."""


@dataclass
class Outcome:
    report: DriftReport
    stats: RecountStats
    partitions: list[PartitionScan]
    topic: str
    account: str | None
    source: str
    warnings: list[str] = field(default_factory=list)


class _Progress:
    """A progress line on stderr for scans longer than a second."""

    def __init__(self, err: TextIO, total: int, enabled: bool) -> None:
        self.err = err
        self.total = total
        self.enabled = enabled and total > 0
        self.tty = bool(getattr(err, "isatty", lambda: False)())
        self.started = self.shown = time.monotonic()
        self.printed = False

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        every = 0.5 if self.tty else 5.0
        if not force and (now - self.started < 1.0 or now - self.shown < every):
            return
        if force and not self.printed:
            return
        self.shown = now
        pct = 100.0 * done / self.total
        rate = done / max(now - self.started, 1e-9)
        line = f"tally: reconcile read {done:,}/{self.total:,} messages ({pct:.0f}%, {rate:,.0f}/s)"
        if self.tty:
            self.err.write("\r" + line + "\x1b[K")
        else:
            self.err.write(line + "\n")
        self.err.flush()
        self.printed = True

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        if self.enabled and self.printed and self.tty:
            self.err.write("\n")
            self.err.flush()


def _kafka_down(bootstrap: str, exc: BaseException) -> ReconcileError:
    name = type(exc).__name__
    detail = str(exc) or name
    if not detail.startswith(name):  # aiokafka's messages often start with it already
        detail = f"{name}: {detail}"
    return ReconcileError(
        f"cannot read Kafka at {bootstrap} ({detail}); check TALLY_KAFKA_BOOTSTRAP and that "
        "the broker runs"
    )


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="tally-reconcile",
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000),
    )
    try:
        async with asyncio.timeout(KAFKA_TIMEOUT_S):
            await admin.start()
            # Every topic (no names): naming one would let the broker auto-create it.
            described = await admin.describe_topics()
    except Exception as exc:  # connection refused, timeout, broker errors alike
        raise _kafka_down(bootstrap, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    for entry in described:
        if entry["topic"] == topic and int(entry["error_code"]) == 0:
            return sorted(int(p["partition"]) for p in entry["partitions"])
    raise ReconcileError(
        f"Kafka at {bootstrap} has no topic {topic!r}; set TALLY_EVENTS_TOPIC to the topic "
        "gateways publish to"
    )


def _published(record: Any, fallback: datetime) -> datetime:
    # A record without a timestamp (old message format) is judged at the time of the
    # scan, which is what a worker reading it now would do.
    stamp = getattr(record, "timestamp", None)
    if stamp is None or stamp < 0:
        return fallback
    return datetime.fromtimestamp(stamp / 1000, UTC)


async def reconcile(
    *,
    bootstrap: str,
    topic: str,
    limits: Limits,
    start: datetime,
    end: datetime,
    source: TotalsSource,
    account: str | None = None,
    since_publish: datetime | None = None,
    err: TextIO | None = None,
) -> Outcome:
    """Recount [start, end) from the log, read the rollups, compare. Raises ReconcileError."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    since, until = check_range(start, end)
    partitions = await _partitions(bootstrap, topic)
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,  # no group: nothing joins, nothing commits
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="tally-reconcile",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000),
    )
    try:
        async with asyncio.timeout(KAFKA_TIMEOUT_S):
            await consumer.start()
            log_end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
            log_start = {
                tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()
            }
            first = dict(log_start)
            if since_publish is not None:
                found = await consumer.offsets_for_times(
                    {tp: int(since_publish.timestamp() * 1000) for tp in tps}
                )
                # None: nothing published since then in that partition.
                first = {
                    tp.partition: (hit.offset if hit is not None else log_end[tp.partition])
                    for tp, hit in found.items()
                }
    except Exception as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise _kafka_down(bootstrap, exc) from None

    try:
        warnings: list[str] = []
        stored = await _read_totals(source, topic, since, until, account)
        stop = await _stops(consumer, tps, log_end, stored, topic, warnings)
        plan = [
            PartitionScan(p, log_start[p], log_end[p], min(first[p], stop[p]), stop[p])
            for p in partitions
        ]
        recount = Recount(since, until, limits, account)
        first_published = await _scan(consumer, topic, plan, recount, bootstrap, err)
    finally:
        await consumer.stop()

    lag = {s.partition: s.log_end - s.stop for s in plan if s.log_end > s.stop}
    if lag and stored.counted_offsets is not None:
        parts = ", ".join(f"{p}: {n:,}" for p, n in sorted(lag.items()))
        warnings.append(
            f"{sum(lag.values()):,} messages are published but not counted by the worker yet "
            f"(partition {parts}); they are left out on both sides"
        )
    earliest = since - limits.max_future
    for scan in plan:
        # Retention deleted the messages below log_start. An event in the range was
        # published at or after `since` minus the future allowance; if the oldest
        # retained message is later than that, deleted ones may have held such events.
        published = first_published.get(scan.partition)
        if (
            since_publish is None
            and scan.log_start > 0
            and (published is None or published > earliest)
        ):
            warnings.append(
                f"partition {scan.partition}: offsets below {scan.log_start:,} are deleted "
                "(retention) and may have held events of the range: drift there may be "
                "events Kafka no longer has, not a miscount; check a later --from"
            )
    return Outcome(
        report=compare(recount.totals, stored.accounts, since, until),
        stats=recount.stats,
        partitions=plan,
        topic=topic,
        account=account,
        source=source.description,
        warnings=warnings,
    )


async def _read_totals(
    source: TotalsSource, topic: str, since: datetime, until: datetime, account: str | None
) -> StoredView:
    try:
        return await asyncio.to_thread(source.totals, topic, since, until, account)
    except ReconcileError:
        raise
    except Exception as exc:  # the store refusing a query, an answer of the wrong shape
        first = (str(exc).splitlines() or [""])[0][:300]
        raise ReconcileError(
            f"cannot read the rollups from {source.description} ({type(exc).__name__}: "
            f"{first}); check TALLY_CLICKHOUSE_URL / TALLY_CLICKHOUSE_DATABASE or the API"
        ) from None


async def _stops(
    consumer: Any,
    tps: list[Any],
    log_end: dict[int, int],
    stored: StoredView,
    topic: str,
    warnings: list[str],
) -> dict[int, int]:
    """Per partition, the offset to read up to: what the rollups reflect."""
    if stored.counted_offsets is None:
        warnings.append(
            f"the store holds no counted offsets for topic {topic!r}: comparing with "
            "everything published when the check began, so events the worker has not "
            "counted yet show as drift"
        )
        return dict(log_end)
    stop = {p: stored.counted_offsets.get(p, 0) for p in log_end}
    if any(stop[p] > log_end[p] for p in stop):
        # The worker counted messages published after step 1: read the end again.
        fresh = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        for p in stop:
            if stop[p] > fresh[p]:
                warnings.append(
                    f"partition {p}: the store says offsets below {stop[p]:,} are counted but "
                    f"the log ends at {fresh[p]:,}: the store belongs to an older incarnation "
                    "of the topic? Comparing with the whole log"
                )
                stop[p] = fresh[p]
            log_end[p] = max(log_end[p], fresh[p])
    return stop


async def _scan(
    consumer: Any,
    topic: str,
    plan: list[PartitionScan],
    recount: Recount,
    bootstrap: str,
    err: TextIO | None,
) -> dict[int, datetime]:
    """Feed [start, stop) of every partition to `recount`; return each partition's first
    record's publish time (for the retention check)."""
    from aiokafka.structs import TopicPartition

    active = {TopicPartition(topic, s.partition): s for s in plan if s.start < s.stop}
    first_published: dict[int, datetime] = {}
    if not active:
        return first_published
    consumer.assign(list(active))
    for tp, planned in active.items():
        consumer.seek(tp, planned.start)
    scan_time = datetime.now(UTC)
    progress = _Progress(
        err or sys.stderr, sum(s.stop - s.start for s in active.values()), bool(err)
    )
    done = 0
    last_record = time.monotonic()
    while active:
        try:
            batch = await consumer.getmany(*active, timeout_ms=500, max_records=10_000)
        except Exception as exc:
            raise _kafka_down(bootstrap, exc) from None
        for tp, records in batch.items():
            reading = active.get(tp)
            if reading is None:
                continue
            for record in records:
                if record.offset >= reading.stop:
                    break
                published = _published(record, scan_time)
                first_published.setdefault(tp.partition, published)
                recount.add_message(record.value, published)
                done += 1
            if records:
                last_record = time.monotonic()
        # By position, not by the last record: offsets may have gaps (compaction,
        # transaction markers), and a partition whose remaining offsets are all gaps
        # returns no record at all.
        for tp in list(active):
            if await consumer.position(tp) >= active[tp].stop:
                consumer.pause(tp)
                del active[tp]
        progress.update(done)
        if active and time.monotonic() - last_record > STALL_S:
            left = ", ".join(str(tp.partition) for tp in active)
            raise ReconcileError(
                f"Kafka at {bootstrap} returned nothing for {STALL_S:.0f}s with partitions "
                f"{left} not read to the end; check the broker and run this again"
            )
    progress.finish(done)
    return first_published


# -- the range ---------------------------------------------------------------------------


def check_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The aligned minutes of [start, end), or ReconcileError when there are none."""
    if start >= end:
        raise ReconcileError(
            f"--from ({format_time(start)}) must be before --to ({format_time(end)})"
        )
    since, until = align_range(start, end)
    if since >= until:
        raise ReconcileError(
            f"no minute starts in {format_time(start)}..{format_time(end)}; rollups are per "
            "minute: widen the range to include a minute boundary"
        )
    return since, until


# -- output ------------------------------------------------------------------------------


def _measure_label(name: str) -> str:
    if name == "units_micro":
        return "units"
    if name.startswith("events."):
        return "events " + name.removeprefix("events.")
    return name


def _value(name: str, value: int) -> str:
    return format_units(value) if name == "units_micro" else f"{value:,}"


def _delta(name: str, delta: int) -> str:
    return ("+" if delta > 0 else "") + _value(name, delta)


def as_json(outcome: Outcome) -> dict[str, Any]:
    report = outcome.report
    stats = outcome.stats
    return {
        "ok": report.ok,
        "minutes_from": format_time(report.since),
        "minutes_to": format_time(report.until),
        "account": outcome.account,
        "checked": {
            "accounts": report.accounts,
            "events": report.events,
            "units": format_units(report.units_micro).replace(",", ""),
            "units_micro": report.units_micro,
        },
        "drift": [
            {
                "account": d.account,
                "in_log": d.expected is not None,
                "in_rollups": d.stored is not None,
                "differences": [
                    {"measure": x.measure, "log": x.expected, "rollups": x.stored, "delta": x.delta}
                    for x in d.differences
                ],
            }
            for d in report.drifts
        ],
        "scan": {
            "topic": outcome.topic,
            "messages": stats.messages,
            "events": stats.events,
            "duplicates": stats.duplicates,
            "rejected": stats.rejected,
            "partitions": [
                {
                    "partition": s.partition,
                    "log_start": s.log_start,
                    "log_end": s.log_end,
                    "read_from": s.start,
                    "read_to": s.stop,
                }
                for s in outcome.partitions
            ],
        },
        "rollups_from": outcome.source,
        "warnings": outcome.warnings,
    }


def as_text(outcome: Outcome) -> str:
    report = outcome.report
    span = f"{format_time(report.since)} .. {format_time(report.until)}"
    recounted = f"{report.events:,} events, {format_units(report.units_micro)} units"
    if report.ok:
        return f"no drift: {report.accounts:,} accounts, {recounted} checked ({span})"
    rows = []
    for drift in report.drifts:
        note = (
            "only in the rollups"
            if drift.expected is None
            else "missing from the rollups"
            if drift.stored is None
            else ""
        )
        for x in drift.differences:
            rows.append(
                [
                    drift.account,
                    _measure_label(x.measure),
                    _value(x.measure, x.expected),
                    _value(x.measure, x.stored),
                    _delta(x.measure, x.delta),
                    note,
                ]
            )
    head = (
        f"drift in {len(report.drifts):,} of {report.accounts:,} accounts "
        f"({recounted} recounted, {span})"
    )
    body = table(rows, ["ACCOUNT", "MEASURE", "LOG", "ROLLUPS", "DIFF", "NOTE"])
    return f"{head}\nDIFF = rollups - log: + counted too much, - too little\n{body}"


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
            limits=limits_of(settings),
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
    from processors.settings import WorkerSettings
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
