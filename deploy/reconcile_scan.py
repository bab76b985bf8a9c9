"""`tally reconcile`'s log side: recount a range from the events Kafka retains, up to the
offsets the rollups reflect, and compare (deploy/reconcile_cli.py says the whole
procedure and why it stops at the counted offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from deploy.exceptions import ReconcileError
from deploy.reconcile_source import StoredView, TotalsSource
from processors import Limits, Recount, RecountStats
from schemas.totals import DriftReport, compare
from schemas.windows import format_time, minute_range

STALL_S = 30.0
"""No record for this long while offsets remain to be read: Kafka is not answering."""
KAFKA_TIMEOUT_S = 30.0


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
        log = await _log_offsets(consumer, tps, since_publish)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise _kafka_down(bootstrap, exc) from None

    try:
        warnings: list[str] = []
        stored = await _read_totals(source, topic, since, until, account)
        stop = await _stops(consumer, tps, log.end, stored, topic, warnings)
        plan = [
            PartitionScan(p, log.start[p], log.end[p], min(log.first[p], stop[p]), stop[p])
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
    if since_publish is None:
        warnings += _retention_warnings(plan, first_published, since - limits.max_future)
    return Outcome(
        report=compare(recount.totals, stored.accounts, since, until),
        stats=recount.stats,
        partitions=plan,
        topic=topic,
        account=account,
        source=source.description,
        warnings=warnings,
    )


@dataclass(frozen=True, slots=True)
class LogOffsets:
    start: dict[int, int]
    """Per partition, the first offset Kafka still retains."""
    end: dict[int, int]
    """Per partition, the end offset when the check began."""
    first: dict[int, int]
    """Per partition, the first offset to read: `start`, or the first published at or
    after --since-publish."""


async def _log_offsets(consumer: Any, tps: list[Any], since_publish: datetime | None) -> LogOffsets:
    async with asyncio.timeout(KAFKA_TIMEOUT_S):
        await consumer.start()
        log_end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        log_start = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
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
    return LogOffsets(log_start, log_end, first)


def _retention_warnings(
    plan: list[PartitionScan], first_published: dict[int, datetime], earliest: datetime
) -> list[str]:
    """Partitions whose deleted offsets may have held events of the range.

    Retention deleted the messages below log_start. An event in the range was
    published at or after `earliest` (the range's start minus the future allowance);
    if the oldest retained message is later than that, deleted ones may have held
    such events.
    """
    warnings = []
    for scan in plan:
        published = first_published.get(scan.partition)
        if scan.log_start > 0 and (published is None or published > earliest):
            warnings.append(
                f"partition {scan.partition}: offsets below {scan.log_start:,} are deleted "
                "(retention) and may have held events of the range: drift there may be "
                "events Kafka no longer has, not a miscount; check a later --from"
            )
    return warnings


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
    since, until = minute_range(start, end)
    if since >= until:
        raise ReconcileError(
            f"no minute starts in {format_time(start)}..{format_time(end)}; rollups are per "
            "minute: widen the range to include a minute boundary"
        )
    return since, until
