"""The two usage endpoints (CONTRACT §3): the product's face."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Response

from processors.windows import format_time, period_end_inclusive, used_percentage
from query_api import queries
from query_api.accounts import Account
from query_api.deps import AccountCallerDep, ServicesDep
from query_api.errors import RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from query_api.models import (
    AccountUsageOut,
    LimitOut,
    MetaOut,
    PeriodOut,
    RequestsOut,
    StreamsOut,
    UsageDataOut,
    UsageV1Out,
    WindowUsageOut,
)
from query_api.plans import Plan
from query_api.usage import (
    AccountUsage,
    WindowUse,
    compute,
    history_start,
    history_start_any_anchor,
)

router = APIRouter(tags=["usage"])
ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An admin key (it has no usage)"},
    **RATE_LIMITED_RESPONSE,
}
_PLAN_LIMIT_HEADERS: dict[int | str, dict[str, object]] = {
    200: {
        "headers": {
            name: {"description": text, "schema": {"type": kind}}
            for name, text, kind in (
                ("X-RateLimit-Limit", "The plan's per_minute limit.", "integer"),
                ("X-RateLimit-Remaining", "per_minute minus requests this minute.", "integer"),
                ("X-RateLimit-Reset", "Epoch seconds of the next minute boundary.", "integer"),
                ("X-Data-Delay", "Seconds the data lags behind now.", "number"),
            )
        }
    }
}
"""On 200 these describe the account's plan limit (gateways enforce it), not the API's
own limit, whose X-RateLimit-* headers come only with a 429."""
# Events may be up to 5 minutes ahead of the clock (CONTRACT §1).
AHEAD = timedelta(minutes=6)


def _plan_of(svc: ServicesDep, account_id: str, account: Account | None) -> Plan:
    if account is None:
        # The key outlived its account: treat as an unknown key, not a server fault.
        raise ApiError(401, "unauthorized", "Invalid or missing API key")
    plan = svc.plans.get(account.plan)
    if plan is None:
        raise ApiError(
            500, "internal_error", f"account {account_id} has unknown plan {account.plan!r}"
        )
    return plan


def _since(svc: ServicesDep, account: Account, now: datetime) -> datetime:
    return history_start(
        now, timedelta(days=svc.settings.window_history_days), account.billing_anchor_day
    )


async def _usage(svc: ServicesDep, account_id: str, now: datetime) -> tuple[AccountUsage, Plan]:
    account = await asyncio.to_thread(svc.accounts.get, account_id)
    plan = _plan_of(svc, account_id, account)
    assert account is not None
    rows = await asyncio.to_thread(
        queries.account_minutes, svc.store, account_id, _since(svc, account, now), now + AHEAD
    )
    return compute(rows, plan, account.billing_anchor_day, now), plan


def _window_out(use: WindowUse, limit: float) -> WindowUsageOut:
    return WindowUsageOut(
        used_percentage=used_percentage(use.used_micro, limit),
        resets_at=format_time(use.window.end) if use.window else None,
    )


@router.get(
    "/api/account/usage",
    response_model=AccountUsageOut,
    responses=ERRORS,
    summary="Session and weekly usage as percentages of the plan (Bearer key)",
)
async def account_usage(caller: AccountCallerDep, svc: ServicesDep) -> AccountUsageOut:
    assert caller.account is not None
    usage, plan = await _usage(svc, caller.account, svc.now())
    return AccountUsageOut(
        session=_window_out(usage.session, plan.session_limit),
        weekly=_window_out(usage.weekly, plan.weekly_limit),
        plan=plan.name,
    )


@router.get(
    "/api/v1/account/usage",
    response_model=UsageV1Out,
    responses={**_PLAN_LIMIT_HEADERS, **ERRORS},
    summary="Request counts, the per-minute limit, streams and the billing period",
)
async def account_usage_v1(
    caller: AccountCallerDep, svc: ServicesDep, response: Response
) -> UsageV1Out:
    assert caller.account is not None
    now = svc.now()
    # Every read in one statement and one thread hop: each has a fixed cost that
    # dwarfs these point reads (queries.usage_reads, benchmarks/api.py).
    reads = await asyncio.to_thread(
        queries.usage_reads,
        svc.store,
        caller.account,
        history_start_any_anchor(now, timedelta(days=svc.settings.window_history_days)),
        now + AHEAD,
        now - timedelta(seconds=svc.settings.stream_idle_timeout_s),
        svc.settings.events_topic,
    )
    account = Account(caller.account, *reads.account) if reads.account else None
    plan = _plan_of(svc, caller.account, account)
    assert account is not None
    usage = compute(reads.minutes, plan, account.billing_anchor_day, now)
    active, reflected = reads.active_streams, reads.reflected_until
    remaining = max(0, plan.per_minute - usage.this_minute)
    updated = min(reflected, now) if reflected else datetime.fromtimestamp(0, UTC)
    response.headers["X-RateLimit-Limit"] = str(plan.per_minute)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(int(usage.minute.end.timestamp()))
    response.headers["X-Data-Delay"] = f"{(now - updated).total_seconds():.3f}"
    return UsageV1Out(
        data=UsageDataOut(
            requests=RequestsOut(
                today=usage.today,
                this_week=usage.this_week,
                this_month=usage.this_month,
                limit=LimitOut(
                    per_minute=plan.per_minute,
                    remaining=remaining,
                    resets_at=format_time(usage.minute.end),
                ),
            ),
            streams=StreamsOut(active=active, max=plan.max_streams),
            period=PeriodOut(
                start=format_time(usage.period.start),
                end=format_time(period_end_inclusive(usage.period)),
            ),
        ),
        meta=MetaOut(updated_at=format_time(updated)),
    )
