"""The SQL behind the analytics API (query_api/routes/analytics.py), in one place
(blocking; call via asyncio.to_thread).

Both queries read `rollup_minute` and aggregate with sum() ... GROUP BY, because
merges are eventual (see migration 0001); the offset markers (schemas/rollup_table.py)
are never read. Every user input reaches ClickHouse as a bound parameter; the only
SQL text a request chooses (the bucket expression, the group-by columns, the sort
column) is picked from the fixed tables below, never built from the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from query_api.analytics_cost import QueryBounds, run
from schemas.events import REQUEST, STREAM_CLOSED
from schemas.rollup_table import MARKER_ACCOUNT
from schemas.store import Store

# SQL fragments a request may select, by name. Never extend these from input.
_BUCKET_SQL: dict[str, str] = {
    "minute": "minute",
    "hour": "toStartOfHour(minute)",
    "day": "toStartOfDay(minute)",
}
DIMENSION_SQL: dict[str, str] = {
    "type": "type",
    "route": "route",
    "model": "model",
    "status": "status",
}
_METRIC_SQL: dict[str, str] = {"units": "units", "requests": "requests"}

# Each dimension's JSON member, as ClickHouse writes it: a dimension an event did not
# carry ('' or status 0) is null. Never extended from input, like the tables above.
_DIMENSION_JSON: dict[str, str] = {
    "type": """'"type":', toJSONString(toString(type))""",
    "route": """'"route":', if(route = '', 'null', toJSONString(toString(route)))""",
    "model": """'"model":', if(model = '', 'null', toJSONString(toString(model)))""",
    "status": """'"status":', if(status = 0, 'null', toString(status))""",
}
_TIME_FORMAT = "'%Y-%m-%dT%H:%i:%S.000Z', 'UTC'"


def usage_series(
    store: Store,
    account: str | None,
    since: datetime,
    until: datetime,
    window: str,
    step: timedelta,
    dimensions: Sequence[str],
    bounds: QueryBounds,
) -> list[str]:
    """/api/v1/analytics/usage: buckets of `window` (`step` long) x groups with data,
    for one account or (None) every real account: each a UsageBucketOut as JSON
    text, written by ClickHouse (in Python, building and serialising these rows cost
    the API most of an answer's CPU, holding the GIL).

    Blocking; `since`/`until` are minute-aligned. At most `bounds.max_rows` + 1 rows
    come back (one more than allowed: the caller refuses that many).
    """
    limit = bounds.max_rows + 1
    columns = "".join(f", {DIMENSION_SQL[d]}" for d in dimensions)
    group = ", ',', ".join(_DIMENSION_JSON[d] for d in dimensions) or "''"
    where_account = "account = {a:String}" if account is not None else "account != {a:String}"
    json_row = (
        """concat('{"window_start":"', """
        f"formatDateTime(({_BUCKET_SQL[window]}) AS window_start, {_TIME_FORMAT}), "
        """'","window_end":"', """
        f"formatDateTime(addSeconds(window_start, {{step:UInt32}}), {_TIME_FORMAT}), "
        f"""'","group":{{', {group}, '}},"requests":', """
        "toString(sumIf(events, type = {req:String}) AS requests), "
        """',"units":', toString((sum(units_micro) AS units) / 1000000), '}')"""
    )
    rows = run(
        store,
        f"SELECT {json_row} FROM rollup_minute WHERE {where_account} "
        "AND minute >= {since:DateTime} AND minute < {until:DateTime} "
        "AND type IN ({req:String}, {closed:String}) "
        f"GROUP BY window_start{columns} "
        "HAVING requests > 0 OR units > 0 "
        f"ORDER BY window_start{columns} "
        "LIMIT {limit:UInt32}",
        {
            "a": account if account is not None else MARKER_ACCOUNT,
            "since": since,
            "until": until,
            "step": int(step.total_seconds()),
            "req": REQUEST,
            "closed": STREAM_CLOSED,
            "limit": limit,
        },
        bounds,
        limit,
    )
    return [row[0] for row in rows]


def top_accounts(
    store: Store, since: datetime, until: datetime, metric: str, limit: int, bounds: QueryBounds
) -> list[tuple[str, int, int]]:
    """/api/v1/analytics/top-accounts: (account, requests, units in millionths), by
    `metric` descending then account."""
    order = _METRIC_SQL[metric]
    rows = run(
        store,
        "SELECT account, sumIf(events, type = {req:String}) AS requests, "
        "sum(units_micro) AS units FROM rollup_minute "
        "WHERE account != {m:String} "
        "AND minute >= {since:DateTime} AND minute < {until:DateTime} "
        "AND type IN ({req:String}, {closed:String}) "
        "GROUP BY account HAVING requests > 0 OR units > 0 "
        f"ORDER BY {order} DESC, account ASC LIMIT {{limit:UInt32}}",
        {
            "m": MARKER_ACCOUNT,
            "since": since,
            "until": until,
            "req": REQUEST,
            "closed": STREAM_CLOSED,
            "limit": limit,
        },
        bounds,
        limit,
    )
    return [(str(a), int(r), int(u)) for a, r, u in rows]
