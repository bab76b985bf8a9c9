"""What routes depend on: the services in app.state and the caller's identity."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from query_api.accounts import AccountStore, Principal
from query_api.errors import ApiError, rate_limited, unauthorized
from query_api.plans import Plan
from query_api.ratelimit import RateLimiter
from query_api.readiness import Readiness
from query_api.settings import ApiSettings
from query_api.view import UsageView
from schemas.store import Store


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    settings: ApiSettings
    store: Store
    accounts: AccountStore
    plans: dict[str, Plan]
    limiter: RateLimiter
    """The API's own per-caller limit (query_api/ratelimit.py)."""
    now: Callable[[], datetime] = utcnow
    """The API's clock; tests pin it to compare answers with an exact expectation."""
    view: UsageView | None = None
    """The in-memory usage view (query_api/view.py); None: read the store per request."""
    readiness: Readiness | None = None
    """/readyz's cached verdict (query_api/readiness.py)."""


async def usage_view(svc: Services) -> UsageView | None:
    """The view once loaded, or None when requests must read the store.

    Loaded at startup (the app's lifespan); a server run without a lifespan (tests
    with ASGITransport) loads it on first use. No usage answer precedes the load.
    """
    view = svc.view
    if view is None:
        return None
    if not view.loaded:
        await asyncio.to_thread(view.ensure_loaded, svc.store)
    return view if view.active else None


async def services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    found: Services = request.app.state.services
    return found


def presented_key(request: Request) -> str | None:
    """The key from `X-API-Key` or `Authorization: Bearer` (either endpoint accepts both)."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def client_address(request: Request) -> str:
    """The peer address. Behind a proxy, run uvicorn with --proxy-headers and
    --forwarded-allow-ips so this is the real client: trusting X-Forwarded-For from
    anyone would let a caller pick a fresh address, and a fresh bucket, per request."""
    return request.client.host if request.client else "unknown"


def _spend(svc: Services, bucket: str) -> None:
    decision = svc.limiter.hit(bucket)
    if not decision.allowed:
        raise rate_limited(decision, svc.now().timestamp())


async def principal(request: Request, svc: Annotated[Services, Depends(services)]) -> Principal:
    """The caller, once their key checks out and their rate limit allows the request.

    Requests without a valid key are limited by client address, which throttles key
    guessing. Once an address has spent that budget, its requests are refused (429)
    before their key is even checked: a guess cannot be told from a real key without
    checking it, and checking is what a guesser is after. Valid keys from a busy
    address therefore wait too, until its budget refills.
    """
    anonymous = f"ip:{client_address(request)}"
    key = presented_key(request)
    if not key:
        _spend(svc, anonymous)
        raise unauthorized()
    waiting = svc.limiter.peek(anonymous)
    if not waiting.allowed:
        raise rate_limited(waiting, svc.now().timestamp())
    found: Principal | None
    admin_key = svc.settings.admin_key
    if admin_key is not None and hmac.compare_digest(
        key.encode(), admin_key.get_secret_value().encode()
    ):
        found = Principal(account=None, admin=True, key_prefix="env:TALLY_ADMIN_KEY")
    else:
        # Looked up on every call: a revoked key fails on the very next request
        # (the view drops it as the revocation is written).
        view = await usage_view(svc)
        if view is not None:
            found = view.authenticate(key)
        else:
            found = await asyncio.to_thread(svc.accounts.authenticate, key)
    if found is None:
        _spend(svc, anonymous)
        raise unauthorized()
    # One bucket per key (its prefix), the TALLY_ADMIN_KEY principal being one key.
    _spend(svc, f"key:{found.key_prefix}")
    request.state.principal = found
    return found


async def account_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if caller.account is None:
        raise ApiError(
            403, "forbidden", "admin keys have no usage of their own; use an account key"
        )
    return caller


async def admin_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.admin:
        raise ApiError(403, "forbidden", "this route needs an admin key")
    return caller


ServicesDep = Annotated[Services, Depends(services)]
CallerDep = Annotated[Principal, Depends(principal)]
AccountCallerDep = Annotated[Principal, Depends(account_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
