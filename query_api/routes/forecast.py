"""An account's forecast and alerts (docs/api.md#alerts-and-webhooks): account keys.

The forecast reads the same rows as the usage endpoints (the in-memory view when it
covers the history, else the store) and places the windows the same way
(query_api/usage.py); query_api/alerts/forecast.py says which rate it projects.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from fastapi import APIRouter

from query_api import queries
from query_api.alerts.forecast import forecast
from query_api.alerts.models import (
    AlertOut,
    AlertsOut,
    ForecastOut,
    ForecastResponse,
    WindowForecastOut,
)
from query_api.alerts.store import AlertStore
from query_api.deps import AccountCallerDep, ServicesDep, usage_view
from query_api.errors import RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from query_api.queries import MinuteRow
from query_api.usage import WindowUse, compute, history_start_any_anchor
from schemas.windows import format_time, used_percentage

router = APIRouter(prefix="/api/v1/account", tags=["usage"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An admin key (it has no usage)"},
    **RATE_LIMITED_RESPONSE,
}
# Events may be up to 5 minutes ahead of the clock (docs/api.md#validity).
AHEAD = timedelta(minutes=6)


def _window(
    rows: list[MinuteRow], use: WindowUse, limit: float, now: datetime
) -> WindowForecastOut:
    pct = used_percentage(use.used_micro, limit)
    if use.window is None:
        return WindowForecastOut(
            used_percentage=pct,
            projected_percentage=pct,
            rate_per_hour=0.0,
            resets_at=None,
            exhausted_at=None,
        )
    ahead = forecast(rows, use.window, limit, now)
    return WindowForecastOut(
        used_percentage=pct,
        projected_percentage=ahead.projected_percentage,
        rate_per_hour=round(ahead.rate_micro_per_s * 3600 / 1_000_000, 6),
        resets_at=format_time(use.window.end),
        exhausted_at=format_time(ahead.exhausted_at) if ahead.exhausted_at else None,
    )


@router.get(
    "/forecast",
    response_model=ForecastResponse,
    responses=_ERRORS,
    summary="Usage projected at the session's and the week's reset, and when 100 % is reached",
)
async def get_forecast(caller: AccountCallerDep, svc: ServicesDep) -> ForecastResponse:
    """The rate is the window's usage over its last hour (query_api/alerts/forecast.py)."""
    assert caller.account is not None
    now = svc.now()
    since = history_start_any_anchor(now, timedelta(days=svc.settings.window_history_days))
    idle_cutoff = now - timedelta(seconds=svc.settings.stream_idle_timeout_s)
    view = await usage_view(svc)
    reads = None
    if view is not None and view.covers(since, idle_cutoff):
        # None for an account evicted past TALLY_API_VIEW_MAX_ROWS: read the store.
        reads = view.usage_reads(caller.account, since, now + AHEAD, idle_cutoff)
    if reads is None:
        reads = await asyncio.to_thread(
            queries.usage_reads,
            svc.store,
            caller.account,
            since,
            now + AHEAD,
            idle_cutoff,
            svc.settings.events_topic,
        )
    if reads.account is None:
        raise ApiError(401, "unauthorized", "Invalid or missing API key")
    plan_name, anchor_day, _ = reads.account
    plan = svc.plans.get(plan_name)
    if plan is None:
        raise ApiError(500, "internal_error", f"account has unknown plan {plan_name!r}")
    usage = compute(reads.minutes, plan, anchor_day, now)
    return ForecastResponse(
        data=ForecastOut(
            session=_window(reads.minutes, usage.session, plan.session_limit, now),
            weekly=_window(reads.minutes, usage.weekly, plan.weekly_limit, now),
        )
    )


@router.get(
    "/alerts",
    response_model=AlertsOut,
    responses=_ERRORS,
    summary="The account's alerts, newest first (at most 100)",
)
async def get_alerts(caller: AccountCallerDep, svc: ServicesDep) -> AlertsOut:
    assert caller.account is not None
    found = await asyncio.to_thread(AlertStore(svc.store).alerts, caller.account)
    return AlertsOut(
        data=[
            AlertOut(
                id=a.id,
                type=a.type,
                window=a.window,
                threshold=a.threshold,
                used_percentage=a.used_percentage,
                window_start=format_time(a.window_start),
                resets_at=format_time(a.resets_at),
                emitted_at=format_time(a.emitted_at),
            )
            for a in found
        ]
    )
