"""Analytics routes (docs/api.md#analytics): usage time series and the top accounts.

Both read `rollup_minute` through query_api/analytics_queries.py (`usage_series`,
`top_accounts`), which aggregates with sum() ... GROUP BY because merges are
eventual, never reads the offset markers, and binds every user input as a
parameter: the only SQL text a request chooses is picked from fixed tables there.

Cost per query is bounded: the range may span at most `analytics_max_buckets`
buckets (TALLY_ANALYTICS_MAX_BUCKETS), and query_api/analytics_cost.py bounds the
rows (a larger result is refused with 422 rather than truncated, so a series is
never silently incomplete) and the store time, and charges big answers to the
caller's rate limit. The query and the answer's serialisation run in a worker
thread, so a big answer never holds the event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Query, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from query_api import analytics_queries, queries
from query_api.analytics_cost import QueryBounds
from query_api.deps import AdminDep, CallerDep, Services, ServicesDep, key_bucket
from query_api.errors import RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from schemas.events import SUBJECT_PATTERN, Rfc3339
from schemas.windows import MINUTE, ceil_to, floor_to, format_time, minute_range

router = APIRouter(tags=["analytics"])


WindowName = Literal["minute", "hour", "day"]
Dimension = Literal["type", "route", "model", "status"]
Metric = Literal["units", "requests"]

WINDOWS: dict[str, timedelta] = {
    "minute": MINUTE,
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
DIMENSIONS: tuple[str, ...] = tuple(analytics_queries.DIMENSION_SQL)

NOT_FOUND_MESSAGE = "account not found"
"""The same for an account that does not exist and one the key may not see."""

_SUBJECT = re.compile(SUBJECT_PATTERN)
JSON = "application/json"
# "+02:00" sent unencoded in a query string arrives as " 02:00".
_SPACE_OFFSET = re.compile(r"(:\d{2}(?:\.\d+)?) (\d{2}:\d{2})$")


def _restore_plus(value: Any) -> Any:
    if isinstance(value, str):
        return _SPACE_OFFSET.sub(r"\1+\2", value.strip())
    return value


# The store's DateTime holds 1970-01-01 .. 2106-02-07; a time outside it reached
# ClickHouse as an unparsable parameter (a 500). A round, documented range, with room
# for rounding a range end up to the next day.
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(2100, 1, 1, tzinfo=UTC)


def _in_store_range(value: datetime) -> datetime:
    # Compared before converting: astimezone(UTC) itself overflows at year 1 or 9999.
    if not TIME_MIN <= value <= TIME_MAX:
        raise ValueError(
            "time must lie between 1970-01-01T00:00:00.000Z and 2100-01-01T00:00:00.000Z"
        )
    return value.astimezone(UTC)


QueryTime = Annotated[Rfc3339, BeforeValidator(_restore_plus), AfterValidator(_in_store_range)]

ERRORS_USAGE: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "The key may not do this"},
    404: {
        "model": ErrorBody,
        "description": "An account key named an account other than its own (whether or "
        "not that account exists: the answer is the same)",
    },
    422: {
        "model": ErrorBody,
        "description": "A bad parameter: time without a zone, from >= to, too many "
        "buckets or rows, an unknown window, group_by dimension or metric",
    },
    **RATE_LIMITED_RESPONSE,
}
ERRORS_TOP: dict[int | str, dict[str, Any]] = {
    401: ERRORS_USAGE[401],
    403: {"model": ErrorBody, "description": "An account key (this route needs an admin key)"},
    422: ERRORS_USAGE[422],
    **RATE_LIMITED_RESPONSE,
}


def _example(example: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


# --- response bodies ---------------------------------------------------------------


class UsageBucketOut(BaseModel):
    window_start: str = Field(description="Start of the bucket (UTC, aligned to the window).")
    window_end: str = Field(description="End of the bucket, exclusive: window_start + window.")
    group: dict[str, str | int | None] = Field(
        description='The requested group_by dimensions only, e.g. {"route": "/v1/chat"}; '
        "{} without group_by. null: the events carried no such dimension."
    )
    requests: int = Field(description="Number of tally.request.v1 events.")
    units: float = Field(description="Units of requests plus units of closed streams.")


class UsageMetaOut(BaseModel):
    from_: str = Field(alias="from", description="The range start, as understood (UTC).")
    to: str = Field(description="The range end, exclusive, as understood (UTC).")
    window: WindowName
    group_by: list[Dimension] = Field(description="The dimensions grouped by, in order.")
    account: str | None = Field(description="The account read; null: all accounts.")
    buckets: int = Field(
        description="Number of window buckets the range touches (partial edge buckets "
        "included), whether or not they hold data."
    )
    updated_at: str | None = Field(
        description="The time up to which events are reflected; later buckets may still "
        "grow. null: no events counted yet."
    )

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class UsageSeriesOut(BaseModel):
    model_config = _example(
        {
            "data": [
                {
                    "window_start": "2026-03-29T10:00:00.000Z",
                    "window_end": "2026-03-29T11:00:00.000Z",
                    "group": {"route": "/v1/chat", "status": 200},
                    "requests": 120,
                    "units": 310.5,
                },
                {
                    "window_start": "2026-03-29T10:00:00.000Z",
                    "window_end": "2026-03-29T11:00:00.000Z",
                    "group": {"route": None, "status": None},
                    "requests": 0,
                    "units": 42.0,
                },
            ],
            "meta": {
                "from": "2026-03-29T10:00:00.000Z",
                "to": "2026-03-29T12:00:00.000Z",
                "window": "hour",
                "group_by": ["route", "status"],
                "account": "acme",
                "buckets": 2,
                "updated_at": "2026-03-29T11:42:07.120Z",
            },
        }
    )
    data: list[UsageBucketOut]
    meta: UsageMetaOut


class TopAccountOut(BaseModel):
    account: str
    requests: int = Field(description="Number of tally.request.v1 events.")
    units: float = Field(description="Units of requests plus units of closed streams.")


class TopMetaOut(BaseModel):
    from_: str = Field(alias="from", description="The range start, as understood (UTC).")
    to: str = Field(description="The range end, exclusive, as understood (UTC).")
    metric: Metric
    limit: int

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class TopAccountsOut(BaseModel):
    model_config = _example(
        {
            "data": [
                {"account": "acme", "requests": 14523, "units": 40210.25},
                {"account": "globex", "requests": 9120, "units": 12000.0},
            ],
            "meta": {
                "from": "2026-03-01T00:00:00.000Z",
                "to": "2026-04-01T00:00:00.000Z",
                "metric": "units",
                "limit": 10,
            },
        }
    )
    data: list[TopAccountOut]
    meta: TopMetaOut


# --- parameters ----------------------------------------------------------------------

FromQuery = Annotated[
    QueryTime,
    Query(
        alias="from",
        description="Range start, RFC 3339 with a zone (Z or ±hh:mm; encode + as %2B), "
        "from 1970-01-01T00:00:00Z to 2100-01-01T00:00:00Z.",
        openapi_examples={"UTC": {"value": "2026-03-29T00:00:00.000Z"}},
    ),
]
ToQuery = Annotated[
    QueryTime,
    Query(
        description="Range end, exclusive, RFC 3339 with a zone; must be after `from`, "
        "at most 2100-01-01T00:00:00Z.",
        openapi_examples={"UTC": {"value": "2026-03-30T00:00:00.000Z"}},
    ),
]


# --- the pure parts ------------------------------------------------------------------


def bucket_count(start: datetime, end: datetime, step: timedelta) -> int:
    """How many aligned buckets [start, end) touches, partial ones included."""
    return (ceil_to(end, step) - floor_to(start, step)) // step


def parse_group_by(values: list[str] | None) -> list[Dimension]:
    """`type,route` or repeated `group_by=`: known names, first occurrence order."""
    found: list[Dimension] = []
    for value in values or []:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in analytics_queries.DIMENSION_SQL:
                raise ApiError(
                    422,
                    "validation_error",
                    f"group_by: unknown dimension {part.strip()!r}; "
                    f"allowed: {', '.join(DIMENSIONS)}",
                )
            if name not in found:
                found.append(cast(Dimension, name))
    return found


def check_range(start: datetime, end: datetime) -> None:
    if start >= end:
        raise ApiError(
            422,
            "validation_error",
            f"from ({format_time(start)}) must be before to ({format_time(end)})",
        )


def _units(micro: int) -> float:
    return micro / 1_000_000


# --- routes ---------------------------------------------------------------------------

USAGE_DESCRIPTION = """
A time series of one account's usage (or, for an admin key, of every account).

- **Range**: `[from, to)`. Usage is stored per minute, so a minute counts when its
  *start* lies in the range: `from=10:00:30Z` begins with the 10:01 minute.
  `from` must be before `to`; both must lie in 1970-01-01T00:00:00Z ..
  2100-01-01T00:00:00Z (else 422).
- **Buckets** are aligned to UTC minute, hour or day boundaries (`window`, default
  `hour`). `window_start`/`window_end` always name the whole aligned bucket; a
  partial bucket at either edge of the range holds only the minutes inside the
  range. The range may touch at most `TALLY_ANALYTICS_MAX_BUCKETS` buckets (default
  10,000); more is a 422 naming the maximum: use a coarser window.
- **Only buckets and groups with data** (requests or units above zero) are returned,
  ordered by `window_start`, then by the group values in `group_by` order.
- **`requests`** counts `tally.request.v1` events; **`units`** adds the units of
  requests and of closed streams (`tally.stream.closed.v1`).
- **`group_by`**: a comma list (or repeated parameter) of `type`, `route`, `model`,
  `status`. `group` holds exactly those keys. A dimension an event did not carry is
  `null` (a request without route, model or status). Stream-closed events carry no
  route, model or status, so their units appear under `null` for those dimensions
  and under `type` `tally.stream.closed.v1` (with `requests` 0).
- **Result size**: at most `TALLY_ANALYTICS_MAX_ROWS` rows (buckets x groups, default
  10,000); a larger result is refused with 422 (never truncated): use a coarser
  window, a shorter range or fewer dimensions. A query running longer than
  `TALLY_ANALYTICS_MAX_SECONDS` (default 5) in the store is refused the same way.
- **Cost**: an answer counts against the key's API rate limit as one request plus one
  per `TALLY_ANALYTICS_ROWS_PER_TOKEN` rows (default 100), refused answers included:
  big answers leave fewer requests in the key's budget.
- **Who sees what**: an account key sees its own account only; `account` may be
  omitted or be its own id, any other id gives 404 `not_found`, the same answer
  whether or not that account exists. An admin key may name any account id (an id
  with no usage gives an empty series), or omit `account` for all accounts together.
  An empty `account=` is the same as omitting it.
"""

TOP_DESCRIPTION = """
The accounts with the most usage in `[from, to)` (admin key only), sorted by `metric`
(`units` by default, or `requests`) descending, then by account id. Accounts with
neither requests nor units in the range are left out. The range follows the same
rules as `/api/v1/analytics/usage`: minute granularity, a minute counts when its start
lies in the range.
"""


@router.get(
    "/api/v1/analytics/usage",
    response_model=UsageSeriesOut,
    responses=ERRORS_USAGE,
    summary="Usage over time, in minute/hour/day buckets, optionally grouped",
    description=USAGE_DESCRIPTION,
)
async def analytics_usage(
    caller: CallerDep,
    svc: ServicesDep,
    from_: FromQuery,
    to: ToQuery,
    window: Annotated[
        WindowName, Query(description="Bucket size, aligned to UTC boundaries.")
    ] = "hour",
    group_by: Annotated[
        list[str] | None,
        Query(
            description="Dimensions to group by: comma-separated or repeated; any of "
            "type, route, model, status.",
            examples=[["route", "status"]],
        ),
    ] = None,
    account: Annotated[
        str | None,
        Query(
            max_length=128,
            description="Account id. Account keys: omit (or give their own id). Admin keys: "
            "any id, or omit for all accounts.",
            examples=["acme"],
        ),
    ] = None,
) -> Response:
    start, end = from_.astimezone(UTC), to.astimezone(UTC)
    check_range(start, end)
    dimensions = parse_group_by(group_by)
    step = WINDOWS[window]
    buckets = bucket_count(start, end, step)
    limit = svc.settings.analytics_max_buckets
    if buckets > limit:
        coarser = [w for w, s in WINDOWS.items() if s > step]
        hint = (
            f"use a coarser window ({' or '.join(coarser)}) or a shorter range"
            if coarser
            else "use a shorter range"
        )
        raise ApiError(
            422,
            "validation_error",
            f"the range spans {buckets} {window} buckets; the maximum is {limit}: {hint}",
        )

    target = account or None
    if target is not None and not _SUBJECT.fullmatch(target):
        raise ApiError(422, "validation_error", "account: not a valid account id")
    if not caller.admin:
        if target is not None and target != caller.account:
            raise ApiError(404, "not_found", NOT_FOUND_MESSAGE)
        target = caller.account
        if target is None:  # a non-admin key always has an account; be safe anyway
            raise ApiError(404, "not_found", NOT_FOUND_MESSAGE)

    query = SeriesQuery(target, start, end, window, dimensions, buckets, key_bucket(caller))
    body = await asyncio.to_thread(series_answer, svc, query, QueryBounds.of(svc.settings))
    return Response(body, media_type=JSON)


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    """One validated analytics/usage request."""

    account: str | None
    start: datetime
    end: datetime
    window: WindowName
    dimensions: list[Dimension]
    buckets: int
    bucket: str
    """The caller's rate-limit bucket, charged for the answer's size."""


def series_answer(svc: Services, query: SeriesQuery, bounds: QueryBounds) -> bytes:
    """The series' JSON body (UsageSeriesOut). Blocking, and run in a worker thread
    as a whole: the query, the charge, the row check and the serialisation, so none
    of it holds the event loop.

    Rows are charged whether they are served or refused for being too many: the
    store and this process did the work either way. The rows arrive as JSON text
    (analytics_queries.usage_series): this process only joins them.
    """
    since, until = minute_range(query.start, query.end)
    rows: list[str] = []
    if since < until:
        rows = analytics_queries.usage_series(
            svc.store,
            query.account,
            since,
            until,
            query.window,
            WINDOWS[query.window],
            query.dimensions,
            bounds,
        )
    svc.limiter.charge(query.bucket, bounds.extra_tokens(len(rows)))
    bounds.check_rows(len(rows))
    reflected = queries.reflected_until(svc.store, svc.settings.events_topic)
    now = svc.now()
    meta = UsageMetaOut(
        from_=format_time(query.start),
        to=format_time(query.end),
        window=query.window,
        group_by=query.dimensions,
        account=query.account,
        buckets=query.buckets,
        updated_at=format_time(min(reflected, now)) if reflected else None,
    )
    meta_json = json.dumps(meta.model_dump(mode="json", by_alias=True), separators=(",", ":"))
    return f'{{"data":[{",".join(rows)}],"meta":{meta_json}}}'.encode()


@router.get(
    "/api/v1/analytics/top-accounts",
    response_model=TopAccountsOut,
    responses=ERRORS_TOP,
    summary="The accounts with the most usage in a range (admin key only)",
    description=TOP_DESCRIPTION,
)
async def analytics_top_accounts(
    caller: AdminDep,
    svc: ServicesDep,
    from_: FromQuery,
    to: ToQuery,
    metric: Annotated[Metric, Query(description="What to rank by.")] = "units",
    limit: Annotated[int, Query(ge=1, le=1000, description="How many accounts.")] = 10,
) -> TopAccountsOut:
    start, end = from_.astimezone(UTC), to.astimezone(UTC)
    check_range(start, end)
    since, until = minute_range(start, end)
    rows: list[tuple[str, int, int]] = []
    if since < until:
        bounds = QueryBounds.of(svc.settings)
        rows = await asyncio.to_thread(
            analytics_queries.top_accounts, svc.store, since, until, metric, limit, bounds
        )
    return TopAccountsOut(
        data=[TopAccountOut(account=a, requests=r, units=_units(u)) for a, r, u in rows],
        meta=TopMetaOut(from_=format_time(start), to=format_time(end), metric=metric, limit=limit),
    )
