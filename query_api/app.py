"""The FastAPI application: routers, the error envelope, request ids, OpenAPI."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from processors.gc_tuning import tune_gc
from query_api import errors, metrics
from query_api.accounts import AccountStore
from query_api.deps import Services, utcnow
from query_api.plans import load_plans
from query_api.ratelimit import Clock, RateLimiter
from query_api.routes import admin, analytics, dashboard, health, usage
from query_api.settings import ApiSettings
from query_api.view import UsageView
from schemas.store import Store

if TYPE_CHECKING:
    from processors.sink import Sink

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


class RequestIdMiddleware:
    """X-Request-Id on every answer, and one access-log line per request.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
    runs each request through a task group and memory streams, which cost more CPU
    than the whole usage answer (benchmarks/api.py).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        # Echo a caller's id so their logs and ours line up; otherwise make one.
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request.state.request_id = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log_access(request, 500, rid, started)
            raise
        log_access(request, status, rid, started)


def create_app(
    settings: ApiSettings,
    store: Store,
    now: Callable[[], datetime] | None = None,
    rate_clock: Clock | None = None,
) -> FastAPI:
    """The app. `now` pins the clock usage is computed at; `rate_clock` (monotonic
    seconds) drives the rate limiter's refills. Both are for tests."""
    view = new_view(settings, store, now or utcnow)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Before the server accepts a connection: no usage answer precedes the load.
        if view is not None:
            await asyncio.to_thread(view.ensure_loaded, store)
            # The loaded view is long-lived: freezing it keeps the cyclic collector
            # from walking it over and over, and each request allocates plenty of
            # short-lived objects (processors/gc_tuning.py says why).
            tune_gc()
        yield

    app = FastAPI(
        title="Tally usage API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = Services(
        settings=settings,
        store=store,
        accounts=AccountStore(store, view),
        view=view,
        plans=load_plans(settings.plans),
        limiter=RateLimiter(
            settings.api_rate_per_s, settings.api_rate_burst, clock=rate_clock or time.monotonic
        ),
        now=now or utcnow,
    )
    errors.install(app)

    app.add_middleware(RequestIdMiddleware)
    app.include_router(usage.router)
    app.include_router(analytics.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    metrics.install(app)
    return app


def new_view(settings: ApiSettings, store: Store, now: Callable[[], datetime]) -> UsageView | None:
    """The usage view, where it can be exact: the embedded store, which only this
    process writes. A ClickHouse server has other writers (a separate sink), so
    there every request reads the store."""
    if settings.api_usage_view == "off" or not store.embedded:
        return None
    return UsageView(
        settings.events_topic,
        history=timedelta(days=settings.window_history_days),
        idle=timedelta(seconds=settings.stream_idle_timeout_s),
        max_rows=settings.api_view_max_rows,
        now=now,
    )


def attach_sink(app: FastAPI, sink: Sink) -> None:
    """`tally up`: the sink in this process writes the store the API reads; its
    INSERTs keep the view exact. Call before the sink starts: the view loads now,
    so no INSERT lands between the load and the listener."""
    services: Services = app.state.services
    if services.view is not None:
        services.view.ensure_loaded(services.store)
        sink.add_listener(services.view.apply)
