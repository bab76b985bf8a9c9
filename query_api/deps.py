"""What routes depend on: the services in app.state and the caller's identity."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request, Response

from query_api.accounts import AccountStore, Principal
from query_api.errors import ApiError, rate_limited, unauthorized
from query_api.ingest import Ingest
from query_api.plans import Plan
from query_api.ratelimit import RateLimiter
from query_api.readiness import Readiness
from query_api.refusals import RefusalHold
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
    refusals: RefusalHold
    """When its 429s are sent (query_api/refusals.py)."""
    now: Callable[[], datetime] = utcnow
    """The API's clock; tests pin it to compare answers with an exact expectation."""
    view: UsageView | None = None
    """The in-memory usage view (query_api/view.py); None: read the store per request."""
    readiness: Readiness | None = None
    """/readyz's cached verdict (query_api/readiness.py)."""
    ingest: Ingest | None = None
    """POST /api/v1/events (query_api/ingest.py); None: this process takes no events."""


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


async def _spend(svc: Services, bucket: str, *, failed_key: bool = False) -> None:
    decision = svc.limiter.hit(bucket)
    if not decision.allowed:
        sent = await svc.refusals.hold(decision, failed_key=failed_key)
        raise rate_limited(sent, svc.now().timestamp())


async def principal(request: Request, svc: Annotated[Services, Depends(services)]) -> Principal:
    """The caller, once their key checks out and their rate limit allows the request.

    Every key presented is checked, and a valid one is limited by its own bucket
    only: however busy its address, a valid key is never refused for its neighbours'
    failures (behind a proxy every caller shares one address). Requests with a
    missing or invalid key spend their client address's bucket and get 401 while it
    lasts, 429 after that, which throttles key guessing without touching anyone with
    a real key (keys carry 192 random bits: guessing one is hopeless anyway).

    A caller already found for this request (query_api/guard.py checks admin callers
    before their body is read) is returned as it is, neither checked nor charged again.
    """
    return await authenticate(request, svc, charge=True)


async def authenticate(request: Request, svc: Services, *, charge: bool) -> Principal:
    """`principal`; `charge=False` leaves a valid key's own bucket alone (POST
    /api/v1/events: a body is bounded by its size and by Kafka's acknowledgement, and
    a gateway sends many). A missing or invalid key is charged to its address always."""
    known: Principal | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    key = presented_key(request)
    found = await _lookup(svc, key) if key else None
    if found is None:
        await _spend(svc, f"ip:{client_address(request)}", failed_key=True)
        raise unauthorized()
    # One bucket per key (its prefix), the TALLY_ADMIN_KEY principal being one key.
    if charge:
        await _spend(svc, key_bucket(found))
    request.state.principal = found
    return found


def key_bucket(caller: Principal) -> str:
    """The rate-limit bucket of a caller with a valid key."""
    return f"key:{caller.key_prefix}"


async def _lookup(svc: Services, key: str) -> Principal | None:
    admin_key = svc.settings.admin_key
    if admin_key is not None and hmac.compare_digest(
        key.encode(), admin_key.get_secret_value().encode()
    ):
        return Principal(account=None, admin=True, key_prefix="env:TALLY_ADMIN_KEY")
    # Looked up on every call: a revoked key fails on the very next request
    # (the view drops it as the revocation is written).
    view = await usage_view(svc)
    if view is not None:
        return view.authenticate(key)
    return await asyncio.to_thread(svc.accounts.authenticate, key)


INGEST_READS_NOTHING = "an ingest key only sends events (POST /api/v1/events); it reads nothing"


async def account_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if caller.ingest:
        raise ApiError(403, "forbidden", INGEST_READS_NOTHING)
    if caller.account is None:
        raise ApiError(
            403, "forbidden", "admin keys have no usage of their own; use an account key"
        )
    return caller


async def reader_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    """An account or admin key: what may read usage (an ingest key may not)."""
    if caller.ingest:
        raise ApiError(403, "forbidden", INGEST_READS_NOTHING)
    return caller


async def ingest_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    """An ingest or admin key: what may send events (an account key may not)."""
    if not (caller.ingest or caller.admin):
        raise ApiError(
            403,
            "forbidden",
            "an account key may not send events; use an ingest key "
            '(POST /api/v1/admin/keys with {"ingest": true})',
        )
    return caller


async def admin_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.admin:
        raise ApiError(403, "forbidden", "this route needs an admin key")
    return caller


async def no_store(response: Response) -> None:
    """For answers that carry a key or a secret: no cache (browser, proxy, CDN) may
    keep a copy of what is shown only once."""
    response.headers["Cache-Control"] = "no-store"


NO_STORE_HEADER = {
    "Cache-Control": {
        "description": "`no-store`: the body carries a key shown once; keep no copy.",
        "schema": {"type": "string"},
    }
}
"""The header `no_store` sets, for the OpenAPI `headers` of those answers."""

ServicesDep = Annotated[Services, Depends(services)]
CallerDep = Annotated[Principal, Depends(reader_principal)]
AccountCallerDep = Annotated[Principal, Depends(account_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
IngestDep = Annotated[Principal, Depends(ingest_principal)]
