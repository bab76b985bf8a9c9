"""The FastAPI application: routers, the error envelope, request ids, OpenAPI."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

from fastapi import FastAPI, Request, Response

from query_api import errors, metrics
from query_api.accounts import AccountStore
from query_api.deps import Services, utcnow
from query_api.plans import load_plans
from query_api.ratelimit import Clock, RateLimiter
from query_api.routes import admin, analytics, dashboard, health, usage
from query_api.settings import ApiSettings
from schemas.store import Store

DESCRIPTION = """
Usage metering for API companies: what each account has used, served from rollups
that Tally's processors keep in ClickHouse.

**Authentication.** `Authorization: Bearer <api_key>`; the `/api/v1/...` routes also
accept `X-API-Key: <api_key>`. Account keys see their own account only; admin keys
(or `TALLY_ADMIN_KEY`) administer plans, accounts and keys.

**Rate limit.** Each API key may make `TALLY_API_RATE_BURST` requests at once and
`TALLY_API_RATE_PER_S` per second sustained (defaults 100 and 50); requests without a
valid key count against the client's address, and once that is spent the address
gets 429 before any key it sends is checked. Over the limit: 429 `rate_limited` with
`Retry-After` (seconds). The limit is per API process (with M replicas a caller may make
M times as many requests) and is separate from the plan's `per_minute` limit, which
`/api/v1/account/usage` reports in its `X-RateLimit-*` headers. `/healthz`, `/readyz`,
`/docs` and `/openapi.json` are not limited.

**Times** are UTC, RFC 3339 with milliseconds and `Z`.

## Errors
Every error has the body `{"error": {"code", "message", "docs"}}`:

""" + "\n".join(f"- `{code}`: {text}" for code, text in errors.ERROR_CODES.items())

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("tally.access")


def log_access(request: Request, status: int, request_id: str, started: float) -> None:
    """One line per request; the account, never the key (nor its prefix)."""
    principal = getattr(request.state, "principal", None)
    account = None
    if principal is not None:
        account = "admin" if principal.admin and principal.account is None else principal.account
    access_log.info(
        "%s %s %d",
        request.method,
        request.url.path,
        status,
        extra={
            "request_id": request_id,
            "method": request.method,
            "path": request.url.path,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "account": account,
        },
    )


def create_app(
    settings: ApiSettings,
    store: Store,
    now: Callable[[], datetime] | None = None,
    rate_clock: Clock | None = None,
) -> FastAPI:
    """The app. `now` pins the clock usage is computed at; `rate_clock` (monotonic
    seconds) drives the rate limiter's refills. Both are for tests."""
    app = FastAPI(
        title="Tally usage API",
        version="0.1.0",
        description=DESCRIPTION,
    )
    app.state.services = Services(
        settings=settings,
        store=store,
        accounts=AccountStore(store),
        plans=load_plans(settings.plans),
        limiter=RateLimiter(
            settings.api_rate_per_s, settings.api_rate_burst, clock=rate_clock or time.monotonic
        ),
        now=now or utcnow,
    )
    errors.install(app)

    @app.middleware("http")
    async def request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Echo a caller's id so their logs and ours line up; otherwise make one.
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request.state.request_id = rid
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log_access(request, 500, rid, started)
            raise
        response.headers["X-Request-Id"] = rid
        log_access(request, response.status_code, rid, started)
        return response

    app.include_router(usage.router)
    app.include_router(analytics.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    metrics.install(app)
    return app
