"""The enforcement sync (producers/enforcement_sync.py) against a mocked limits route."""

from __future__ import annotations

import time
from typing import Any

import httpx

from producers.enforcement_sync import LIMITS_PATH, Enforcement, parse_account


def _answer(minute: str, requests: int) -> dict[str, Any]:
    """One account as query_api/routes/limits.py answers it."""
    quota = {"used_percentage": 1.0, "used_micro": 1_000_000, "limit_units": 100.0,
             "resets_at": "2030-01-01T05:00:00.000Z"}  # fmt: skip
    return {
        "plan": "pro",
        "minute": {
            "start": minute,
            "resets_at": minute,
            "requests": requests,
            "per_minute": 300,
            "remaining": 300 - requests,
        },
        "session": quota,
        "weekly": {**quota, "resets_at": None},
        "streams": {"active": 2, "max": 10},
        "reflected_until": "2030-01-01T00:00:00.500Z",
    }


def test_parse_account_reads_the_routes_shape() -> None:
    synced = parse_account(_answer("2030-01-01T00:00:00.000Z", 12))
    assert synced is not None
    assert synced.minute_start == 1_893_456_000.0
    assert (synced.per_minute, synced.minute_requests) == (300, 12)
    assert synced.session.used_micro == 1_000_000
    assert synced.weekly.resets_at is None
    assert (synced.active_streams, synced.max_streams) == (2, 10)
    assert synced.reflected_until == 1_893_456_000.5
    assert parse_account(None) is None


async def test_sync_posts_active_accounts_and_applies_the_answers() -> None:
    seen: list[Any] = []

    def route(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["authorization"], request.content))
        body = {"accounts": {"acme": _answer("2030-01-01T00:00:00.000Z", 5), "ghost": None}}
        return httpx.Response(200, json=body)

    e = Enforcement("http://tally", "admin-key")
    e.core.admit("acme", time.time())
    e.core.admit("ghost", time.time())
    async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as client:
        await e.sync_once(client)
    [(path, auth, content)] = seen
    assert (path, auth) == (LIMITS_PATH, "Bearer admin-key")
    assert b'"acme"' in content
    assert b'"ghost"' in content
    acme = e.core.state("acme").synced
    assert acme is not None
    assert acme.minute_requests == 5
    assert e.core.state("ghost").synced is None
    assert not e.core.state("ghost").uses  # not an account: nothing kept for it
    assert e.stats.sync_failures == 0


async def test_an_unreachable_api_is_counted_and_fails_open() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    e = Enforcement("http://tally", "admin-key", stale_after_s=10)
    e.core.admit("acme", time.time())
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as client:
        await e.sync_once(client)  # never raises
    assert e.stats.sync_failures == 1
    assert e.core.decide("acme", time.time()) is None
    assert e.stats.unsynced_allowed == 1
