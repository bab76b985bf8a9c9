"""Settings the docs promise (docs/configuration.md, docs/api.md), each seen over HTTP
on a real store.

TALLY_API_USAGE_VIEW=off (every usage answer read from the store per request),
TALLY_PLANS (overriding a shipped plan and adding one), TALLY_STREAM_IDLE_TIMEOUT_S
and TALLY_WINDOW_HISTORY_DAYS at values other than their defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from query_api.usage import history_start_any_anchor
from schemas.events import REQUEST, STREAM_OPENED
from schemas.rollup_table import COLUMNS
from schemas.store import Store

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 26, 12, 0, 30, 250_000, tzinfo=UTC)  # a Thursday
ADMIN = "promises-admin-7f3Kq9zR2mWx8vLp4TnB"
V1, V0 = "/api/v1/account/usage", "/api/account/usage"
PLANS = {
    "pro": {"per_minute": 7, "session_limit": 50},
    "weekly-first": {"weekly_anchor": "first_request", "weekly_limit": 100},
}


WK_DAYS = range(1, 60, 3)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _request(account: str, at: datetime, events: int, units: int) -> list[object]:
    minute = _minute(at)
    return [account, minute, REQUEST, "/v1/x", "POST", "", 200, "", events, units * 1_000_000,
            0.0, 0, 0, minute, 0]  # fmt: skip


def _opened(account: str, at: datetime, stream: str) -> list[object]:
    return [account, _minute(at), STREAM_OPENED, "", "", "", 0, stream, 1, 0, 0.0, 0, 0, at, 0]


@pytest.fixture
def keys(store: Store) -> dict[str, str]:
    accounts = AccountStore(store)
    found: dict[str, str] = {}
    for account, plan in (("acme", "pro"), ("globex", "free"), ("wk", "weekly-first")):
        accounts.create(account, plan)
        found[account], _ = accounts.create_key(account, admin=False)
    rows = [
        _request("acme", NOW, 3, 5),
        _request("acme", NOW - timedelta(minutes=1), 2, 4),
        _request("acme", NOW - timedelta(days=2), 11, 11),
        _request("acme", NOW - timedelta(days=20), 13, 13),
        _request("globex", NOW - timedelta(hours=3), 1, 1),
        _opened("acme", NOW - timedelta(minutes=10), "s-ten-minutes"),
        _opened("acme", NOW - timedelta(seconds=30), "s-just-now"),
        # Weekly first-request windows chained every third day for 8 weeks:
        # no week-long gap says where a window began, so the history read decides.
        *[_request("wk", NOW - timedelta(days=d, hours=3), 1, 1) for d in WK_DAYS],
    ]
    store.insert("rollup_minute", rows, COLUMNS)
    return found


@asynccontextmanager
async def _client(store: Store, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = ApiSettings(
        admin_key=ADMIN,
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        plans=orjson.dumps(PLANS).decode(),
        **overrides,
    )
    app = create_app(settings, store, now=lambda: NOW)
    async with app.router.lifespan_context(app):  # loads the usage view, when on
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            yield client


async def _usage(client: httpx.AsyncClient, key: str) -> tuple[Any, Any, dict[str, str]]:
    v1 = await client.get(V1, headers={"X-API-Key": key})
    v0 = await client.get(V0, headers={"Authorization": f"Bearer {key}"})
    assert v1.status_code == v0.status_code == 200, (v1.text, v0.text)
    limits = {k: v for k, v in v1.headers.items() if k.startswith("x-ratelimit")}
    return v1.json(), v0.json(), limits


async def test_the_usage_endpoints_answer_alike_with_the_view_off(
    store: Store, keys: dict[str, str]
) -> None:
    answers = {}
    for mode in ("auto", "off"):
        async with _client(store, api_usage_view=mode) as client:
            answers[mode] = [await _usage(client, keys[a]) for a in ("acme", "globex", "wk")]
    assert answers["off"] == answers["auto"]
    v1, v0, limits = answers["off"][0]
    requests = v1["data"]["requests"]
    assert (requests["today"], requests["this_week"]) == (5, 16)
    assert requests["limit"]["per_minute"] == 7
    assert requests["limit"]["remaining"] == 7 - 3
    assert limits["x-ratelimit-remaining"] == "4"
    assert v0["plan"] == "pro"


async def test_tally_plans_override_a_shipped_plan_and_add_one(
    store: Store, keys: dict[str, str]
) -> None:
    async with _client(store) as client:
        listed = await client.get("/api/v1/admin/plans", headers={"X-API-Key": ADMIN})
        plans = {p["name"]: p for p in listed.json()["data"]}
        v1, v0, _ = await _usage(client, keys["acme"])
    assert plans["pro"]["per_minute"] == 7
    assert plans["pro"]["session_limit"] == 50
    assert plans["weekly-first"]["weekly_anchor"] == "first_request"
    assert plans["free"]["per_minute"] != 7  # only the named plan changed
    assert v1["data"]["requests"]["limit"]["per_minute"] == 7
    # The session holds the last two minutes' 9 units: 9 of the overridden 50.
    assert v0["session"]["used_percentage"] == 18.0


async def test_a_shorter_stream_idle_timeout_ends_streams_sooner(
    store: Store, keys: dict[str, str]
) -> None:
    active = {}
    for timeout in (900.0, 300.0, 20.0):
        async with _client(store, stream_idle_timeout_s=timeout) as client:
            v1, _, _ = await _usage(client, keys["acme"])
            active[timeout] = v1["data"]["streams"]["active"]
    # Opened 10 minutes and 30 seconds ago, neither closed.
    assert active == {900.0: 2, 300.0: 1, 20.0: 0}


def _weekly_oracle(history_days: float) -> float:
    """used_percentage of `wk`'s weekly window, placed by hand from the history read."""
    start = history_start_any_anchor(NOW, timedelta(days=history_days))
    seen = sorted(_minute(NOW - timedelta(days=d, hours=3)) for d in WK_DAYS)
    seen = [at for at in seen if at >= start]
    window: datetime | None = seen[0]
    while window is not None and window + timedelta(days=7) <= NOW:
        window = next((at for at in seen if at >= window + timedelta(days=7)), None)
    if window is None:  # the last window ended and no request began another
        return 0.0
    return 100 * sum(1 for at in seen if at >= window) / PLANS["weekly-first"]["weekly_limit"]


async def test_the_window_history_bounds_where_first_request_windows_start(
    store: Store, keys: dict[str, str]
) -> None:
    used = {}
    for days in (42.0, 45.0, 48.0):
        async with _client(store, window_history_days=days) as client:
            _, v0, _ = await _usage(client, keys["wk"])
            used[days] = v0["weekly"]["used_percentage"]
    assert used == {days: _weekly_oracle(days) for days in used}, used
    assert len(set(used.values())) == 3, used  # the setting decides here
