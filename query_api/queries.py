"""The SQL behind the usage API, in one place (blocking; call via asyncio.to_thread).

Every query reads `rollup_minute` for one account's key range, aggregating with
sum()/max() because background merges are eventual (see migration 0001).
"""

from __future__ import annotations

from datetime import datetime

from processors.rollup import MARKER_ACCOUNT, MARKER_TYPE
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.store import Store

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
    rows = store.query(
        "SELECT min(t), count() FROM ("
        " SELECT status, max(last_time) AS t FROM rollup_minute"
        " WHERE account = {m:String} AND type = {k:String} AND route = {topic:String}"
        " GROUP BY status)",
        {"m": MARKER_ACCOUNT, "k": MARKER_TYPE, "topic": topic},
    )
    if not rows or not rows[0][1]:
        return None
    found: datetime = rows[0][0]
    return found
