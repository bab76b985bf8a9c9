"""The SQL behind the usage API, in one place (blocking; call via asyncio.to_thread).

Every query reads `rollup_minute` for one account's key range, aggregating with
sum()/max() because background merges are eventual (see migration 0001). Markers
are told from deltas by schemas/rollup_table.py's names and read alone by its
`read_markers`. The analytics SQL is query_api/analytics_queries.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import MARKER_ACCOUNT, MARKER_PARAMS, MARKER_WHERE, read_markers
from schemas.store import Store
from schemas.windows import EPOCH

MinuteRow = tuple[datetime, int, int]
"""(minute, requests, units in millionths): one minute of one account."""


def account_minutes(
    store: Store, account: str, since: datetime, until: datetime
) -> list[MinuteRow]:
    rows = store.query(
        "SELECT minute, sumIf(events, type = {req:String}), "
        "sumIf(units_micro, type IN ({req:String}, {closed:String})) "
        "FROM rollup_minute "
        "WHERE account = {a:String} AND minute >= {since:DateTime} AND minute < {until:DateTime} "
        "GROUP BY minute ORDER BY minute",
        {"a": account, "since": since, "until": until, "req": REQUEST, "closed": STREAM_CLOSED},
    )
    return [(m, int(r), int(u)) for m, r, u in rows]


def active_streams(store: Store, account: str, idle_cutoff: datetime) -> int:
    """Streams opened (or re-announced) after the cutoff and not closed since."""
    since = idle_cutoff.replace(second=0, microsecond=0)
    rows = store.query(
        "SELECT count() FROM ("
        " SELECT stream_id,"
        "  maxIf(last_time, type = {opened:String}) AS opened_at,"
        "  countIf(type = {closed:String}) AS closes"
        " FROM rollup_minute"
        " WHERE account = {a:String} AND minute >= {since:DateTime}"
        "  AND type IN ({opened:String}, {closed:String})"
        " GROUP BY stream_id"
        ") WHERE closes = 0 AND opened_at > {cutoff:DateTime64(3)}",
        {
            "a": account,
            "since": since,
            "cutoff": idle_cutoff,
            "opened": STREAM_OPENED,
            "closed": STREAM_CLOSED,
        },
    )
    return int(rows[0][0]) if rows else 0


def reflected_until(store: Store, topic: str) -> datetime | None:
    """The time up to which every partition's events are counted (None: nothing yet)."""
    markers = read_markers(store, topic)
    return min(m.last_time for m in markers) if markers else None


@dataclass(frozen=True, slots=True)
class PipelineMarks:
    """What the store says about the pipeline feeding it (for /readyz)."""

    reflected_until: datetime | None
    """As `reflected_until`: workers report through it, idle ones too."""
    sink_wrote: datetime | None
    """When the sink last wrote: its rollups-partition markers carry their write time."""


def pipeline_marks(store: Store, events_topic: str, rollups_topic: str) -> PipelineMarks:
    """`reflected_until` and the sink's last write, in one statement."""
    markers = read_markers(store, events_topic, rollups_topic)
    reflected = [m.last_time for m in markers if m.topic == events_topic]
    # Markers written before they carried a write time hold the epoch: not a write time.
    wrote = [m.last_time for m in markers if m.topic == rollups_topic and m.last_time > EPOCH]
    return PipelineMarks(
        reflected_until=min(reflected) if reflected else None,
        sink_wrote=max(wrote) if wrote else None,
    )


@dataclass(frozen=True, slots=True)
class UsageReads:
    account: tuple[str, int, datetime] | None
    """(plan, billing_anchor_day, created_at); None: no such account."""
    minutes: list[MinuteRow]
    active_streams: int
    reflected_until: datetime | None
    """The least of `partitions`: every event before it is in `minutes`."""
    partitions: Mapping[int, datetime] = field(default_factory=dict)
    """Per partition of the events topic, the time up to which its events are in
    `minutes`: read in the same snapshot, so a gateway can tell, for the one partition
    an account's events go to, which of its own requests these counts hold."""


def usage_reads(
    store: Store, account: str, since: datetime, until: datetime, idle_cutoff: datetime, topic: str
) -> UsageReads:
    """The account's row, `account_minutes`, `active_streams` and `reflected_until`
    in ONE statement.

    /api/v1/account/usage needs all four on every call. On the embedded store each
    statement has a fixed cost (about 1 ms, even for SELECT 1) that dwarfs these
    point reads, and the store's lock serialises statements: one statement instead
    of four is what the endpoint's throughput is made of (benchmarks/api.py).
    The same SQL as AccountStore.get and the three functions above, each branch
    tagged by `kind`, glued by UNION ALL into columns (kind, m, n, u, t, s).
    """
    rows = store.query(
        "SELECT 0 AS kind, minute AS m, sumIf(events, type = {req:String}) AS n,"
        " sumIf(units_micro, type IN ({req:String}, {closed:String})) AS u,"
        " toDateTime64(0, 3, 'UTC') AS t, '' AS s"
        " FROM rollup_minute"
        " WHERE account = {a:String} AND minute >= {since:DateTime} AND minute < {until:DateTime}"
        " GROUP BY minute "
        "UNION ALL "
        "SELECT 1, toDateTime(0, 'UTC'), count(), 0, toDateTime64(0, 3, 'UTC'), '' FROM ("
        " SELECT stream_id,"
        "  maxIf(last_time, type = {opened:String}) AS opened_at,"
        "  countIf(type = {closed:String}) AS closes"
        " FROM rollup_minute"
        " WHERE account = {a:String} AND minute >= {stream_since:DateTime}"
        "  AND type IN ({opened:String}, {closed:String})"
        " GROUP BY stream_id"
        ") WHERE closes = 0 AND opened_at > {cutoff:DateTime64(3)} "
        "UNION ALL "
        "SELECT 2, toDateTime(0, 'UTC'), toUInt64(status), 0, max(last_time), ''"
        " FROM rollup_minute"
        f" WHERE {MARKER_WHERE} AND route = {{topic:String}}"
        " GROUP BY status "
        "UNION ALL "
        "SELECT 3, toDateTime(0, 'UTC'), billing_anchor_day, 0, created_at, toString(plan)"
        " FROM accounts FINAL WHERE id = {a:String}",
        {
            "a": account,
            "since": since,
            "until": until,
            "req": REQUEST,
            "closed": STREAM_CLOSED,
            "opened": STREAM_OPENED,
            "stream_since": idle_cutoff.replace(second=0, microsecond=0),
            "cutoff": idle_cutoff,
            **MARKER_PARAMS,
            "topic": topic,
        },
    )
    minutes = sorted((m, int(n), int(u)) for kind, m, n, u, _, _ in rows if kind == 0)
    partitions = {int(n): t for kind, _, n, _, t, _ in rows if kind == 2}
    return UsageReads(
        account=next(((s, int(n), t) for kind, _, n, _, t, s in rows if kind == 3), None),
        minutes=minutes,
        active_streams=next((int(n) for kind, _, n, _, _, _ in rows if kind == 1), 0),
        reflected_until=min(partitions.values()) if partitions else None,
        partitions=partitions,
    )


class UsageRow(NamedTuple):
    """One account's rollups of one event type, summed over a range."""

    account: str
    type: str
    events: int
    units_micro: int


@dataclass(frozen=True, slots=True)
class StoredTotals:
    usage: list[UsageRow]
    counted_offsets: dict[int, int] | None
    """Per partition of the events topic, the next offset not counted; None: no markers."""


def account_totals(
    store: Store, topic: str, since: datetime, until: datetime, account: str | None
) -> StoredTotals:
    """Every account's (or `account`'s) rollups over the minutes [since, until), by type,
    and the offsets of `topic` they reflect.

    One SELECT reads both the totals and the offset markers: ClickHouse answers a
    query from one snapshot of the table's parts, and deltas are written in one
    INSERT with the markers of the events offsets they cover, so the offsets are
    exactly those the totals cover even while rollups are being written (what
    `tally reconcile` needs to compare like with like).
    """
    rows = store.query(
        "SELECT account, type, if(account = {marker_account:String}, status, 0) AS part, "
        "sum(events), sum(units_micro), max(offset_end) FROM rollup_minute "
        "WHERE (account != {marker_account:String} AND minute >= {since:DateTime} "
        "AND minute < {until:DateTime} AND ({a:String} = '' OR account = {a:String})) "
        f"OR ({MARKER_WHERE} AND route = {{topic:String}}) "
        "GROUP BY account, type, part",
        {
            **MARKER_PARAMS,
            "topic": topic,
            "since": since,
            "until": until,
            "a": account or "",
        },
    )
    offsets: dict[int, int] | None = None
    usage: list[UsageRow] = []
    for acct, kind, part, events, units_micro, offset_end in rows:
        if acct == MARKER_ACCOUNT:
            offsets = offsets or {}
            offsets[int(part)] = int(offset_end)
        else:
            usage.append(UsageRow(str(acct), str(kind), int(events), int(units_micro)))
    return StoredTotals(usage, offsets)


def reflected_by_partition(store: Store, topic: str) -> dict[int, datetime]:
    """Per partition of `topic`, the time up to which its events are counted
    (`reflected_until` is the least of these)."""
    return {m.partition: m.last_time for m in read_markers(store, topic)}
