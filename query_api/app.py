"""The FastAPI application: routers, the error envelope, request ids, OpenAPI."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import lru_cache

from fastapi import FastAPI
from starlette.datastructures import URL
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from processors import WorkerSettings
from producers.settings import ProducerSettings
from query_api import errors, metrics
from query_api.accounts import AccountStore
from query_api.deps import Services, utcnow
from query_api.guard import RequestGuard
from query_api.ingest import Ingest, Publisher, worker_limits
from query_api.plans import load_plans
from query_api.ratelimit import Clock, RateLimiter
from query_api.readiness import Readiness
from query_api.refusals import RefusalHold
from query_api.routes import (
    admin,
    analytics,
    dashboard,
    docs,
    events,
    forecast,
    health,
    limits,
    usage,
    webhooks,
)
from query_api.settings import ApiSettings
from query_api.view import UsageView
from query_api.view_feed import ViewFeed
from schemas.gc_tuning import tune_gc
from schemas.store import Store

DESCRIPTION = """
Usage metering for API companies: what each account has used, served from rollups
that Tally's processors keep in ClickHouse.

**Authentication.** `Authorization: Bearer <api_key>`; the `/api/v1/...` routes also
accept `X-API-Key: <api_key>`. Account keys see their own account only; admin keys
(or `TALLY_ADMIN_KEY`) administer plans, accounts and keys.

**Rate limit.** Each API key may make `TALLY_API_RATE_BURST` requests at once and
`TALLY_API_RATE_PER_S` per second sustained (defaults 100 and 50); an analytics
answer counts as one request plus one per `TALLY_ANALYTICS_ROWS_PER_TOKEN` rows.
Requests with a missing or invalid key count against the client's address (401, and
429 once that budget is spent); a valid key is never refused for its address.
`POST /api/v1/events` does not spend a valid key's budget: a body is bounded by its
size and its events count, and answered once Kafka took them. Over
the limit: 429 `rate_limited` with `Retry-After` (seconds). The limit is per API
process (with M replicas a caller may make M times as many requests) and is separate
from the plan's `per_minute` limit, which both usage endpoints report in their
`X-RateLimit-*` headers. `/healthz`, `/readyz`, `/docs` and `/openapi.json` are not
limited.

**Request bodies** may be at most `TALLY_API_MAX_BODY_BYTES` (default 1 MiB), else 413
`payload_too_large`, refused before the body is read. On the admin routes the key is
checked before the body is read, too.

**Standard rate-limit fields.** Besides `X-RateLimit-*`, both usage endpoints and every
429 carry `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers,
RFC 9651 lists). On a usage answer they describe the plan: `"minute";q=<per_minute>;w=60`
and `"streams";q=<max_streams>;qu="concurrent-requests"` (q=0 on a plan without
streaming), with `r` what is left (never below 0) and `t` the seconds until the minute
resets, rounded up. On a 429 they describe the limit that refused the request:
`"api";q=<burst>;w=<seconds an empty bucket takes to refill>`.

**Times** are UTC, RFC 3339 with milliseconds and `Z`.

## Errors
Every error has the body `{"error": {"code", "message", "docs"}}`:

""" + "\n".join(f"- `{code}`: {text}" for code, text in errors.ERROR_CODES.items())

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("tally.access")


_VERSION_4 = 4 << 76
_VARIANT = 0x8000 << 48
_VERSION_AND_VARIANT_BITS = (0xF000 << 64) | (0xC000 << 48)


def new_request_id() -> str:
    """`uuid.uuid4().hex`, without building a UUID object per request."""
    bits = int.from_bytes(os.urandom(16), "big") & ~_VERSION_AND_VARIANT_BITS
    return f"{bits | _VERSION_4 | _VARIANT:032x}"


@lru_cache(maxsize=256)
def _url_path(scheme: str, server: tuple[str, int] | None, path: str, host: bytes | None) -> str:
    # Exactly `Request.url.path` (Starlette rebuilds and re-parses the URL, which a
    # Host header can bend), computed once per distinct input rather than per request.
    headers = [] if host is None else [(b"host", host)]
    scope = {"scheme": scheme, "server": server, "path": path, "headers": headers}
    return URL(scope=scope).path


def log_access(scope: Scope, status: int, request_id: str, started: float) -> None:
    """One line per request; the account, never the key (nor its prefix)."""
    principal = scope.get("state", {}).get("principal")
    account = None
    if principal is not None:
        account = principal.account
        if account is None:
            account = "admin" if principal.admin else "ingest"
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    server = scope.get("server")
    path = _url_path(
        scope.get("scheme", "http"), None if server is None else tuple(server), scope["path"], host
    )
    method = scope["method"]
    access_log.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "account": account,
        },
    )


class RequestMiddleware:
    """Per request: the X-Request-Id header, one access-log line, the latency
    histogram (query_api/metrics.py), and the hot usage route served directly.

    One plain-ASGI layer for all of it: Starlette's BaseHTTPMiddleware runs each
    request through a task group and memory streams, and every extra layer wraps
    `send` once more; both cost CPU on every answer (benchmarks/api.py).

    `fast_routes` maps an exact path to (route, ASGI app) for GET, `fast_posts` for
    POST: those requests skip Starlette/FastAPI routing and its exception middleware
    (the app handles its own errors, see routes/usage.py and routes/events.py).
    Anything else, other methods and paths included, goes through the full app as
    usual.
    """

    def __init__(
        self,
        app: ASGIApp,
        fast_routes: dict[str, tuple[BaseRoute, ASGIApp]] | None = None,
        fast_posts: dict[str, tuple[BaseRoute, ASGIApp]] | None = None,
    ) -> None:
        self.app = app
        self.fast_routes = fast_routes or {}
        self.fast_posts = fast_posts or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # Echo a caller's id so their logs and ours line up; otherwise make one.
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _REQUEST_ID.fullmatch(rid):
            rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        raw_rid = rid.encode("latin-1")
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # As MutableHeaders.__setitem__: the first x-request-id replaced in
                # place, any other dropped, else appended.
                headers = list(message["headers"])
                found = [i for i, (name, _) in enumerate(headers) if name == b"x-request-id"]
                for i in reversed(found[1:]):
                    del headers[i]
                if found:
                    headers[found[0]] = (b"x-request-id", raw_rid)
                else:
                    headers.append((b"x-request-id", raw_rid))
                message["headers"] = headers
            await send(message)

        app = self.app
        method = scope["method"]
        if (method == "GET" or method == "POST") and not scope.get("root_path"):
            routes = self.fast_routes if method == "GET" else self.fast_posts
            fast = routes.get(scope["path"])
            if fast is not None:
                route, app = fast
                scope["route"] = route
                scope["path_params"] = {}
        try:
            await app(scope, receive, send_with_id)
        except Exception:
            log_access(scope, 500, rid, started)
            # An exception propagates unobserved, as a response that never started.
            raise
        log_access(scope, status or 500, rid, started)
        metrics.observe(scope, status, started)


def create_app(
    settings: ApiSettings,
    store: Store,
    now: Callable[[], datetime] | None = None,
    rate_clock: Clock = time.monotonic,
    fast_path: bool = True,
    ingest: Ingest | None = None,
) -> FastAPI:
    """The app. `now` pins the clock usage is computed at; `rate_clock` (monotonic
    seconds) drives the rate limiter's refills. Both are for tests, as is
    `fast_path=False` (every route through FastAPI's router, to compare answers).
    `ingest`: what POST /api/v1/events uses (default: `new_ingest(settings)`)."""
    view = new_view(settings, store, now or utcnow)
    ingest = ingest or new_ingest(settings)
    feed = None if view is None else new_feed(settings, store, view)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Before the server accepts a connection: no usage answer precedes the load.
        if view is not None and feed is not None:
            await asyncio.to_thread(view.ensure_loaded, store)
            # The loaded view is long-lived: freezing it keeps the cyclic collector
            # from walking it over and over, and each request allocates plenty of
            # short-lived objects (schemas/gc_tuning.py says why).
            tune_gc()
            feed.start()
        try:
            yield
        finally:
            if feed is not None:
                await feed.stop()
            await ingest.publisher.close()

    app = FastAPI(
        title="Tally usage API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs is routes/docs.py (pinned assets, a CSP); no CDN-loaded ReDoc page.
        docs_url=None,
        redoc_url=None,
    )
    app.state.view_feed = feed
    app.state.services = services = Services(
        settings=settings,
        store=store,
        accounts=AccountStore(store, view),
        view=view,
        plans=load_plans(settings.plans),
        limiter=RateLimiter(settings.api_rate_per_s, settings.api_rate_burst, clock=rate_clock),
        refusals=RefusalHold(
            settings.api_refusal_delay_s, settings.api_refusal_max_held, clock=rate_clock
        ),
        now=now or utcnow,
        readiness=Readiness(settings, store, now or utcnow),
        ingest=ingest,
    )
    errors.install(app)

    app.include_router(usage.router)
    app.include_router(analytics.router)
    app.include_router(admin.router)
    app.include_router(events.router)
    events.install_schemas(app)
    app.include_router(webhooks.router)
    app.include_router(forecast.router)
    app.include_router(limits.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    app.include_router(docs.router)
    # Inside RequestMiddleware: its refusals get request ids and access-log lines.
    app.add_middleware(RequestGuard, services=services)
    app.add_middleware(
        RequestMiddleware,
        fast_routes=usage.fast_routes(app) if fast_path else None,
        fast_posts=events.fast_routes(app, services) if fast_path else None,
    )
    return app


def new_ingest(settings: ApiSettings) -> Ingest:
    """POST /api/v1/events as configured: the worker's limits (TALLY_MAX_EVENT_BYTES,
    TALLY_MAX_LATENESS_S, TALLY_MAX_FUTURE_S) and the producer's settings
    (TALLY_PRODUCER_*), read from the environment like the worker's and gateways'. The
    producer itself is made on the first body (query_api/ingest.py `Publisher`)."""
    return Ingest(
        limits=worker_limits(WorkerSettings(), settings.ingest_max_body_bytes),
        max_events=settings.ingest_max_events,
        publisher=Publisher(settings, ProducerSettings(), settings.ingest_timeout_s),
    )


def new_view(settings: ApiSettings, store: Store, now: Callable[[], datetime]) -> UsageView | None:
    """The usage view (query_api/view.py), on any store unless TALLY_API_USAGE_VIEW=off."""
    if settings.api_usage_view == "off":
        return None
    return UsageView(
        settings.events_topic,
        history=timedelta(days=settings.window_history_days),
        idle=timedelta(seconds=settings.stream_idle_timeout_s),
        max_rows=settings.api_view_max_rows,
        now=now,
        rollups_topic=settings.rollups_topic,
    )


def new_feed(settings: ApiSettings, store: Store, view: UsageView) -> ViewFeed:
    """What keeps `view` exact (query_api/view_feed.py): started by the app's lifespan,
    or, where the server runs without one (`tally up`), by `view_feed(app)`'s caller."""
    return ViewFeed(view, store, settings.bootstrap, settings.rollups_topic)


def view_feed(app: FastAPI) -> ViewFeed | None:
    """The app's view feed, None when the view is off."""
    feed: ViewFeed | None = app.state.view_feed
    return feed
