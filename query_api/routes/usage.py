"""The two usage endpoints (docs/api.md#usage): the product's face."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from processors.windows import Window, format_time, period_end_inclusive, used_percentage
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
from query_api.models import (
    AccountUsageOut,
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


def _since(svc: ServicesDep, account: Account, now: datetime) -> datetime:
    return history_start(
        now, timedelta(days=svc.settings.window_history_days), account.billing_anchor_day
    )


def _idle_cutoff(svc: ServicesDep, now: datetime) -> datetime:
    return now - timedelta(seconds=svc.settings.stream_idle_timeout_s)


async def _usage(svc: ServicesDep, account_id: str, now: datetime) -> tuple[AccountUsage, Plan]:
    view = await usage_view(svc)
    if view is not None:
        found = view.account(account_id)
        account = Account(account_id, *found) if found else None
    else:
        account = await asyncio.to_thread(svc.accounts.get, account_id)
    plan = _plan_of(svc, account_id, account)
    assert account is not None
    since = _since(svc, account, now)
    if view is not None and view.covers(since, _idle_cutoff(svc, now)):
        rows = view.minutes(account_id, since, now + AHEAD)
    else:
        rows = await asyncio.to_thread(
            queries.account_minutes, svc.store, account_id, since, now + AHEAD
        )
    return compute(rows, plan, account.billing_anchor_day, now), plan


def _window_out(use: WindowUse, limit: float) -> WindowUsageOut:
    return WindowUsageOut(
        used_percentage=used_percentage(use.used_micro, limit),
        resets_at=format_time(use.window.end) if use.window else None,
    )


@lru_cache(maxsize=16)
def _minute_texts(minute: Window) -> tuple[str, str]:
    """`resets_at` and X-RateLimit-Reset of a minute: shared by its requests."""
    return format_time(minute.end), str(int(minute.end.timestamp()))


@lru_cache(maxsize=256)
def _period_texts(period: Window) -> tuple[str, str]:
    """`period.start` and `period.end` of a billing period."""
    return format_time(period.start), format_time(period_end_inclusive(period))


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


V1_PATH = "/api/v1/account/usage"


@router.get(
    V1_PATH,
    response_model=UsageV1Out,
    responses={**_PLAN_LIMIT_HEADERS, **ERRORS},
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
    since = history_start_any_anchor(now, timedelta(days=svc.settings.window_history_days))
    idle_cutoff = _idle_cutoff(svc, now)
    view = await usage_view(svc)
    if view is not None and view.covers(since, idle_cutoff):
        # From memory, on the loop: exact (query_api/view.py) and no thread hop.
        reads = view.usage_reads(caller.account, since, now + AHEAD, idle_cutoff)
    else:
        # Every read in one statement and one thread hop: each has a fixed cost that
        # dwarfs these point reads (queries.usage_reads, benchmarks/api.py).
        reads = await asyncio.to_thread(
            queries.usage_reads,
            svc.store,
            caller.account,
            since,
            now + AHEAD,
            idle_cutoff,
            svc.settings.events_topic,
        )
    account = Account(caller.account, *reads.account) if reads.account else None
    plan = _plan_of(svc, caller.account, account)
    assert account is not None
    usage = compute(reads.minutes, plan, account.billing_anchor_day, now)
    active, reflected = reads.active_streams, reads.reflected_until
    remaining = max(0, plan.per_minute - usage.this_minute)
    resets_at, reset_epoch = _minute_texts(usage.minute)
    period_start, period_end = _period_texts(usage.period)
    updated = min(reflected, now) if reflected else datetime.fromtimestamp(0, UTC)
    # Exactly UsageV1Out's fields (query_api/models.py).
    body = {
        "data": {
            "requests": {
                "today": usage.today,
                "this_week": usage.this_week,
                "this_month": usage.this_month,
                "limit": {
                    "per_minute": plan.per_minute,
                    "remaining": remaining,
                    "resets_at": resets_at,
                },
            },
            "streams": {"active": active, "max": plan.max_streams},
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
            "X-RateLimit-Limit": str(plan.per_minute),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": reset_epoch,
            "X-Data-Delay": f"{(now - updated).total_seconds():.3f}",
        },
    )


def fast_routes(app: FastAPI) -> dict[str, tuple[BaseRoute, ASGIApp]]:
    """`GET /api/v1/account/usage` as a bare ASGI app, for query_api/app.py's
    RequestMiddleware to call without routing.

    Answers exactly as through the router: the same endpoint, its ApiErrors through
    the app's own handler for them (as Starlette's exception middleware would call
    it), anything else propagating to the server-error handler as before. Routing
    and the exception middleware otherwise cost about as much CPU as the answer
    (benchmarks/api.py); tests/integration/test_api_fast_path.py compares the two.
    """
    # The router's own route object: what routing puts in scope["route"] (the
    # latency histogram labels requests with its path).
    route = next(
        r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is account_usage_v1
    )
    handler = app.exception_handlers[ApiError]

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        scope["endpoint"] = account_usage_v1
        request = Request(scope, receive, send)
        try:
            response = await account_usage_v1(request)
        except ApiError as exc:
            response = await handler(request, exc)  # type: ignore[misc]
        await response(scope, receive, send)

    return {V1_PATH: (route, serve)}
