"""`POST /api/v1/admin/limits` (docs/api.md#limits-at-the-gateway): what a gateway needs
to hold accounts to their plans (producers/enforcement.py).

Each account's answer is computed by the very code the usage endpoints run
(`routes.usage.answer`: one read, `usage.compute`, `limits.plan_limits`), so the
count a gateway enforces is the count `/api/v1/account/usage` shows. Which events those
counts include is said per account, read in the same snapshot as its counts:
`reflected_until`, the least over the events topic's partitions, and, when the gateway
sends the topic's partition count, `partition_reflected_until`, that of the one
partition the account's events go to (Kafka's murmur2 of the account id, as every
producer places them). A gateway keeps its own requests newer than that and adds them;
with the account's own partition, one lagging partition does not hold every account's
requests locally (counted twice, refused early) until it catches up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, NamedTuple

from fastapi import APIRouter
from pydantic import BaseModel, Field

from producers.partitioning import partition_for
from query_api import queries
from query_api.deps import AdminDep, ServicesDep
from query_api.errors import PAYLOAD_TOO_LARGE_RESPONSE, RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from query_api.routes.usage import Answer, answer
from query_api.usage import WindowUse
from schemas.events import SUBJECT_PATTERN
from schemas.windows import format_time, used_percentage

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

MAX_ACCOUNTS = 1000

_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An account key: this route needs an admin key"},
    422: {"model": ErrorBody, "description": "More than 1000 accounts, or an invalid id"},
    **RATE_LIMITED_RESPONSE,
    **PAYLOAD_TOO_LARGE_RESPONSE,
}

AccountId = Annotated[str, Field(pattern=SUBJECT_PATTERN, max_length=128)]


class LimitsIn(BaseModel):
    accounts: list[AccountId] = Field(max_length=MAX_ACCOUNTS, description="Account ids.")
    partitions: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="The events topic's partition count as the gateway's producer sees "
        "it; given, each account's answer names its partition and that partition's "
        "`partition_reflected_until`.",
    )


class MinuteLimitOut(BaseModel):
    start: str = Field(description="The current UTC minute (schemas/windows.py).")
    resets_at: str = Field(description="Its end: the next minute boundary.")
    requests: int = Field(description="Requests rolled up in this minute so far.")
    per_minute: int
    remaining: int = Field(description="As the usage endpoint's `limit.remaining`.")


class QuotaOut(BaseModel):
    used_percentage: float = Field(description="As /api/account/usage shows it.")
    used_micro: int = Field(description="Units used in the window, in millionths.")
    limit_units: float
    resets_at: str | None = Field(description="End of the window; null: none running.")


class StreamsOut(BaseModel):
    active: int
    max: int


class AccountLimitsOut(BaseModel):
    plan: str
    minute: MinuteLimitOut
    session: QuotaOut
    weekly: QuotaOut
    streams: StreamsOut
    reflected_until: str | None = Field(
        description="The time up to which events of every partition are in THIS "
        "account's counts (read with them, in one snapshot); null: nothing counted yet."
    )
    partition: int | None = Field(
        default=None, description="The partition of the account's events; null: not asked."
    )
    partition_reflected_until: str | None = Field(
        default=None,
        description="The time up to which that partition's events are in the counts (same "
        "snapshot); null: not asked, or nothing of that partition counted yet.",
    )


class LimitsOut(BaseModel):
    now: str = Field(description="The API's clock when it answered.")
    reflected_until: str | None = Field(
        description="Every event published before this (by event time) on every "
        "partition is in the counts; null: nothing counted yet."
    )
    partitions: dict[str, str] = Field(
        description="reflected_until per partition of the events topic."
    )
    accounts: dict[str, AccountLimitsOut | None] = Field(
        description="Per requested id; null for an id that is not an account."
    )


def _quota(use: WindowUse, limit: float) -> QuotaOut:
    return QuotaOut(
        used_percentage=used_percentage(use.used_micro, limit),
        used_micro=use.used_micro,
        limit_units=limit,
        resets_at=format_time(use.window.end) if use.window else None,
    )


class PartitionMark(NamedTuple):
    partition: int | None
    reflected_until: datetime | None


def partition_mark(
    account: str, partitions: int | None, marks: Mapping[int, datetime]
) -> PartitionMark:
    """The partition of `account`'s events among `partitions` and the time up to which
    it is counted in `marks` (None: not asked, or no marker of it yet: nothing of that
    partition may be taken as counted)."""
    if partitions is None:
        return PartitionMark(None, None)
    p = partition_for(account, partitions)
    return PartitionMark(p, marks.get(p))


def _account_out(account_id: str, found: Answer, partitions: int | None) -> AccountLimitsOut:
    usage, limits, plan = found.usage, found.limits, found.plan
    mark = partition_mark(account_id, partitions, found.reads.partitions)
    return AccountLimitsOut(
        plan=plan.name,
        minute=MinuteLimitOut(
            start=format_time(usage.minute.start),
            resets_at=format_time(limits.resets_at),
            requests=usage.this_minute,
            per_minute=limits.per_minute,
            remaining=limits.remaining,
        ),
        session=_quota(usage.session, plan.session_limit),
        weekly=_quota(usage.weekly, plan.weekly_limit),
        streams=StreamsOut(active=limits.active_streams, max=limits.max_streams),
        reflected_until=format_time(reflected)
        if (reflected := found.reads.reflected_until)
        else None,
        partition=mark.partition,
        partition_reflected_until=format_time(mark.reflected_until)
        if mark.reflected_until
        else None,
    )


@router.post(
    "/limits",
    response_model=LimitsOut,
    responses=_RESPONSES,
    summary="Per account, the counts and limits a gateway enforces (admin key)",
)
async def post_limits(body: LimitsIn, caller: AdminDep, svc: ServicesDep) -> LimitsOut:
    """Up to 1000 accounts per call; the same numbers as `GET /api/v1/account/usage`."""
    now = svc.now()
    partitions = await asyncio.to_thread(
        queries.reflected_by_partition, svc.store, svc.settings.events_topic
    )
    accounts: dict[str, AccountLimitsOut | None] = {}
    for account_id in dict.fromkeys(body.accounts):
        try:
            found = await answer(svc, account_id, now)
            accounts[account_id] = _account_out(account_id, found, body.partitions)
        except ApiError as exc:
            if exc.status != 401:  # 401: no such account (usage.answer's verdict)
                raise
            accounts[account_id] = None
    return LimitsOut(
        now=format_time(now),
        reflected_until=format_time(min(partitions.values())) if partitions else None,
        partitions={str(p): format_time(at) for p, at in sorted(partitions.items())},
        accounts=accounts,
    )
