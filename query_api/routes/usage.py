"""The two usage endpoints (docs/api.md#usage): the product's face."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from query_api import queries
from query_api.accounts import Account
from query_api.deps import (
    AccountCallerDep,
    ServicesDep,
    account_principal,
    principal,
    services,
    usage_view,
)
from query_api.errors import RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from query_api.limits import POLICY_HEADER, STATE_HEADER, PlanLimits, plan_headers, plan_limits
from query_api.models import (
    AccountUsageOut,
    UsageV1Out,
    WindowUsageOut,
)
from query_api.plans import Plan
from query_api.queries import UsageReads
from query_api.routes.bare import bare_endpoint
from query_api.usage import AccountUsage, WindowUse, compute, history_start_any_anchor
from schemas.windows import Window, format_time, period_end_inclusive, used_percentage

router = APIRouter(tags=["usage"])
ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An admin key (it has no usage)"},
    **RATE_LIMITED_RESPONSE,
}


def _header(description: str, kind: str) -> dict[str, object]:
    return {"description": description, "schema": {"type": kind}}


_LIMIT_HEADERS: dict[str, dict[str, object]] = {
    "X-RateLimit-Limit": _header("The plan's per_minute limit.", "integer"),
    "X-RateLimit-Remaining": _header("per_minute minus requests this minute.", "integer"),
    "X-RateLimit-Reset": _header("Epoch seconds of the next minute boundary.", "integer"),
    POLICY_HEADER: _header(
        "The plan's limits (draft-ietf-httpapi-ratelimit-headers, an RFC 9651 List): "
        '`"minute";q=<per_minute>;w=60, "streams";q=<max_streams>;qu="concurrent-requests"` '
        "(q=0 for streams on a plan without streaming).",
        "string",
    ),
    STATE_HEADER: _header(
        '`"minute";r=<X-RateLimit-Remaining>;t=<seconds until X-RateLimit-Reset, rounded up>, '
        '"streams";r=<max_streams minus active streams, at least 0>`.',
        "string",
    ),
}
"""On 200 these describe the account's plan limits (query_api/limits.py), not the API's
own limit, whose headers come only with a 429."""
_V0_RESPONSES: dict[int | str, dict[str, object]] = {200: {"headers": _LIMIT_HEADERS}}
_V1_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "headers": {
            **_LIMIT_HEADERS,
            "X-Data-Delay": _header("Seconds the data lags behind now.", "number"),
        }
    }
}
# Events may be up to 5 minutes ahead of the clock (docs/api.md#validity).
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


def _idle_cutoff(svc: ServicesDep, now: datetime) -> datetime:
    return now - timedelta(seconds=svc.settings.stream_idle_timeout_s)


@dataclass(frozen=True, slots=True)
class Answer:
    """What both usage endpoints answer from: one read, one computation."""

    usage: AccountUsage
    plan: Plan
    limits: PlanLimits
    reads: UsageReads


async def answer(svc: ServicesDep, account_id: str, now: datetime) -> Answer:
    since = history_start_any_anchor(now, timedelta(days=svc.settings.window_history_days))
    idle_cutoff = _idle_cutoff(svc, now)
    view = await usage_view(svc)
    reads = None
    if view is not None and view.covers(since, idle_cutoff):
        # From memory, on the loop: exact (query_api/view.py) and no thread hop; None
        # for an account evicted past TALLY_API_VIEW_MAX_ROWS.
        reads = view.usage_reads(account_id, since, now + AHEAD, idle_cutoff)
    if reads is None:
        # Every read in one statement and one thread hop: each has a fixed cost that
        # dwarfs these point reads (queries.usage_reads, benchmarks/api.py).
        reads = await asyncio.to_thread(
            queries.usage_reads,
            svc.store,
            account_id,
            since,
            now + AHEAD,
            idle_cutoff,
            svc.settings.events_topic,
        )
    account = Account(account_id, *reads.account) if reads.account else None
    plan = _plan_of(svc, account_id, account)
    assert account is not None
    usage = compute(reads.minutes, plan, account.billing_anchor_day, now)
    limits = plan_limits(plan, usage, reads.active_streams, now)
    return Answer(usage, plan, limits, reads)


def _window_out(use: WindowUse, limit: float) -> WindowUsageOut:
    return WindowUsageOut(
        used_percentage=used_percentage(use.used_micro, limit),
        resets_at=format_time(use.window.end) if use.window else None,
    )


@lru_cache(maxsize=16)
def _reset_text(resets_at: datetime) -> str:
    """`resets_at` of a minute: shared by its requests."""
    return format_time(resets_at)


@lru_cache(maxsize=256)
def _period_texts(period: Window) -> tuple[str, str]:
    """`period.start` and `period.end` of a billing period."""
    return format_time(period.start), format_time(period_end_inclusive(period))


@router.get(
    "/api/account/usage",
    response_model=AccountUsageOut,
    responses={**_V0_RESPONSES, **ERRORS},
    summary="Session and weekly usage as percentages of the plan (Bearer key)",
)
async def account_usage(
    caller: AccountCallerDep, svc: ServicesDep, response: Response
) -> AccountUsageOut:
    assert caller.account is not None
    found = await answer(svc, caller.account, svc.now())
    response.headers.update(plan_headers(found.limits))
    plan = found.plan
    return AccountUsageOut(
        session=_window_out(found.usage.session, plan.session_limit),
        weekly=_window_out(found.usage.weekly, plan.weekly_limit),
        plan=plan.name,
    )


V1_PATH = "/api/v1/account/usage"


@router.get(
    V1_PATH,
    response_model=UsageV1Out,
    responses={**_V1_RESPONSES, **ERRORS},
    summary="Request counts, the per-minute limit, streams and the billing period",
)
async def account_usage_v1(request: Request) -> Response:
    # The hot path: the caller is resolved by calling the dependencies rather than
    # declaring them (they add no parameters to the OpenAPI document), and the body
    # is rendered here rather than validated again against the response model.
    # FastAPI's dependency solving and re-validation each cost more CPU than the
    # answer itself (benchmarks/api.py); the declared response_model still documents
    # it, and tests/integration/test_api_schemathesis.py checks the body against it.
    svc = await services(request)
    caller = await account_principal(await principal(request, svc))
    assert caller.account is not None
    now = svc.now()
    found = await answer(svc, caller.account, now)
    usage, limits, reflected = found.usage, found.limits, found.reads.reflected_until
    period_start, period_end = _period_texts(usage.period)
    updated = min(reflected, now) if reflected else datetime.fromtimestamp(0, UTC)
    # Exactly UsageV1Out's fields (query_api/models.py); the limit and the headers
    # are both read from `limits`, so they agree.
    body = {
        "data": {
            "requests": {
                "today": usage.today,
                "this_week": usage.this_week,
                "this_month": usage.this_month,
                "limit": {
                    "per_minute": limits.per_minute,
                    "remaining": limits.remaining,
                    "resets_at": _reset_text(limits.resets_at),
                },
            },
            "streams": {"active": limits.active_streams, "max": limits.max_streams},
            "period": {
                "start": period_start,
                "end": period_end,
            },
        },
        "meta": {"updated_at": format_time(updated)},
    }
    return Response(
        orjson.dumps(body),
        media_type="application/json",
        headers={
            **plan_headers(limits),
            "X-Data-Delay": f"{(now - updated).total_seconds():.3f}",
        },
    )


def fast_routes(app: FastAPI) -> dict[str, tuple[BaseRoute, ASGIApp]]:
    """`GET /api/v1/account/usage` as a bare ASGI app (routes/bare.py)."""
    return {V1_PATH: bare_endpoint(app, router, account_usage_v1)}
