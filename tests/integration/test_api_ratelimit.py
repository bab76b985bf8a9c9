"""The API's own rate limit on the real app and a real store.

Each test gets a database of its own in the session's one chdb path. The limiter
runs on an injected clock, so refills happen when a test says so; one test runs on
the real clock to show the default wiring refills in real time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.store import Store

pytestmark = pytest.mark.integration

ENV_ADMIN_KEY = "ratelimit-admin-key-0123456789abc"
USAGE = "/api/v1/account/usage"
NOW = datetime(2026, 3, 29, 12, 0, 30, tzinfo=UTC)
RATE = 2.0  # tokens per second
BURST = 3
LOCAL = "10.1.1.1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def keys(store: Store) -> dict[str, str]:
    accounts = AccountStore(store)
    found: dict[str, str] = {}
    for account in ("acme", "globex"):
        accounts.create(account, "pro")
        found[account], _ = accounts.create_key(account, admin=False)
    found["acme-2"], _ = accounts.create_key("acme", admin=False)
    found["admin"], _ = accounts.create_key(None, admin=True)
    found["env-admin"] = ENV_ADMIN_KEY
    return found


@dataclass
class Api:
    app: FastAPI
    clock: FakeClock
    keys: dict[str, str]

    @asynccontextmanager
    async def client(self, ip: str = LOCAL) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=self.app, client=(ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            yield client

    def headers(self, name: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[name]}


@pytest.fixture
def api(store: Store, store_url: str, keys: dict[str, str]) -> Api:
    clock = FakeClock()
    settings = ApiSettings(
        admin_key=ENV_ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=store.database,
        api_rate_per_s=RATE,
        api_rate_burst=BURST,
        # Refusals at once: these tests step the limiter's clock themselves.
        api_refusal_delay_s=0.0,
    )
    app = create_app(settings, store, now=lambda: NOW, rate_clock=clock)
    return Api(app, clock, keys)


def assert_limited(response: httpx.Response, retry_after: int, reset_in: float) -> None:
    assert response.status_code == 429, response.text
    assert response.json() == {
        "error": {
            "code": "rate_limited",
            "message": response.json()["error"]["message"],
            "docs": response.json()["error"]["docs"],
        }
    }
    assert response.json()["error"]["message"]
    assert response.headers["Retry-After"] == str(retry_after)
    assert response.headers["X-RateLimit-Limit"] == str(BURST)
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-RateLimit-Reset"] == str(math.ceil(NOW.timestamp() + reset_in))
    assert response.headers["X-Request-Id"]


async def test_over_the_limit_is_429_with_the_envelope_and_retry_after(api: Api) -> None:
    async with api.client() as client:
        for _ in range(BURST):
            ok = await client.get(USAGE, headers=api.headers("acme"))
            assert ok.status_code == 200, ok.text
            # On 200 the X-RateLimit-* headers keep describing the plan's per_minute limit.
            assert ok.headers["X-RateLimit-Limit"] == "300"
            assert ok.headers["X-RateLimit-Reset"] == str(int(NOW.timestamp()) + 30)
        refused = await client.get(USAGE, headers=api.headers("acme"))
        # Empty bucket: one token is 1/RATE = 0.5 s away (a whole second in the header),
        # the whole burst BURST/RATE = 1.5 s away.
        assert_limited(refused, retry_after=1, reset_in=BURST / RATE)
        # Every authenticated route shares the key's bucket.
        legacy = await client.get(
            "/api/account/usage", headers={"Authorization": f"Bearer {api.keys['acme']}"}
        )
        assert legacy.status_code == 429


async def test_other_keys_are_not_affected(api: Api) -> None:
    async with api.client() as client:
        for _ in range(BURST):
            assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 200
        assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 429
        # Another account, another key of the same account, admin keys: buckets of their own.
        for _ in range(BURST):
            assert (await client.get(USAGE, headers=api.headers("globex"))).status_code == 200
            assert (await client.get(USAGE, headers=api.headers("acme-2"))).status_code == 200
            plans = await client.get("/api/v1/admin/plans", headers=api.headers("admin"))
            assert plans.status_code == 200
            env = await client.get("/api/v1/admin/plans", headers=api.headers("env-admin"))
            assert env.status_code == 200
        assert (await client.get(USAGE, headers=api.headers("globex"))).status_code == 429
        plans = await client.get("/api/v1/admin/plans", headers=api.headers("admin"))
        assert plans.status_code == 429
        env = await client.get("/api/v1/admin/plans", headers=api.headers("env-admin"))
        assert env.status_code == 429


async def test_requests_are_allowed_again_after_the_refill_time(api: Api) -> None:
    async with api.client() as client:
        for _ in range(BURST):
            assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 200
        refused = await client.get(USAGE, headers=api.headers("acme"))
        assert refused.status_code == 429
        api.clock.advance(0.25)  # half a token
        assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 429
        api.clock.advance(0.25)  # one whole token: one request
        assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 200
        assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 429
        api.clock.advance(BURST / RATE)  # the whole burst again, not more
        statuses = [
            (await client.get(USAGE, headers=api.headers("acme"))).status_code
            for _ in range(BURST + 1)
        ]
        assert statuses == [200] * BURST + [429]


async def test_unauthenticated_floods_are_throttled_per_address(api: Api) -> None:
    attacker, neighbour = "198.51.100.7", "198.51.100.8"
    async with api.client(attacker) as client:
        guesses = [
            {},  # no key at all
            {"X-API-Key": "tly_000000000000_" + "A" * 32},  # well formed, unknown
            {"Authorization": "Bearer not-a-key"},  # malformed
        ]
        statuses = [(await client.get(USAGE, headers=h)).status_code for h in guesses]
        assert statuses == [401] * BURST
        # The address's budget is spent: guesses are refused...
        for headers in guesses:
            refused = await client.get(USAGE, headers=headers)
            assert_limited(refused, retry_after=1, reset_in=BURST / RATE)
        # ...but never a valid key from that address (behind a proxy, every caller's),
        # account, stored admin or TALLY_ADMIN_KEY, on any authenticated route.
        assert (await client.get(USAGE, headers=api.headers("acme"))).status_code == 200
        for admin in ("admin", "env-admin"):
            plans = await client.get("/api/v1/admin/plans", headers=api.headers(admin))
            assert plans.status_code == 200, plans.text
        assert (await client.get(USAGE)).status_code == 429
        # Unlimited routes stay open.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
    async with api.client(neighbour) as client:
        assert (await client.get(USAGE)).status_code == 401
        assert (await client.get(USAGE, headers=api.headers("globex"))).status_code == 200
    # The address recovers like a key does.
    api.clock.advance(1 / RATE)
    async with api.client(attacker) as client:
        assert (await client.get(USAGE)).status_code == 401
        assert (await client.get(USAGE)).status_code == 429


async def test_valid_keys_do_not_spend_the_address_budget(api: Api) -> None:
    async with api.client() as client:
        for name in ("acme", "acme-2", "globex"):
            for _ in range(BURST):
                assert (await client.get(USAGE, headers=api.headers(name))).status_code == 200
        statuses = [(await client.get(USAGE)).status_code for _ in range(BURST + 1)]
        assert statuses == [401] * BURST + [429]


async def test_health_readiness_and_docs_are_not_limited(api: Api) -> None:
    async with api.client() as client:
        for _ in range(BURST * 3):
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code in (200, 503)
            assert (await client.get("/openapi.json")).status_code == 200
            assert (await client.get("/docs")).status_code == 200
        # And they spent nothing: the address still has its whole budget.
        assert [(await client.get(USAGE)).status_code for _ in range(BURST)] == [401] * BURST


async def test_the_real_clock_refills(store: Store, store_url: str) -> None:
    settings = ApiSettings(
        admin_key=ENV_ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=store.database,
        api_rate_per_s=1.0,
        api_rate_burst=1,
    )
    app = create_app(settings, store)  # the default, monotonic clock
    transport = httpx.ASGITransport(app=app)
    # TALLY_ADMIN_KEY on the plans: neither touches the store, so the two requests
    # are microseconds apart even on a loaded host, well inside the 1 s refill.
    plans, headers = "/api/v1/admin/plans", {"X-API-Key": ENV_ADMIN_KEY}
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        assert (await client.get(plans, headers=headers)).status_code == 200
        refused = await client.get(plans, headers=headers)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        await asyncio.sleep(1.1)  # one token at 1/s, and a margin
        assert (await client.get(plans, headers=headers)).status_code == 200


async def test_a_refusal_is_held_until_a_retry_could_succeed(store: Store, store_url: str) -> None:
    """A 429 is sent no sooner than the caller's next request could be allowed (here
    about 1 s, one token at 1/s), and its Retry-After counts from when it is sent."""
    settings = ApiSettings(
        admin_key=ENV_ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=store.database,
        api_rate_per_s=1.0,
        api_rate_burst=1,
        api_refusal_delay_s=5.0,
    )
    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)
    plans, headers = "/api/v1/admin/plans", {"X-API-Key": ENV_ADMIN_KEY}
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        assert (await client.get(plans, headers=headers)).status_code == 200
        started = time.monotonic()
        refused = await client.get(plans, headers=headers)
        held = time.monotonic() - started
        assert refused.status_code == 429
        # Not before the token it lacked has refilled (1 s, less the microseconds
        # between the two requests).
        assert held >= 0.9, held
        # Sent when a retry could succeed: the shortest Retry-After there is, and a
        # retry right away is served.
        assert refused.headers["Retry-After"] == "1"
        assert (await client.get(plans, headers=headers)).status_code == 200


async def test_openapi_documents_the_429_on_authenticated_routes_only(api: Api) -> None:
    async with api.client() as client:
        spec = (await client.get("/openapi.json")).json()
    limited = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path in ("/healthz", "/readyz"):
                assert "429" not in responses, (method, path)
                continue
            limited.add(path)
            documented = responses["429"]
            assert documented["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
            assert set(documented["headers"]) == {
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "RateLimit-Policy",
                "RateLimit",
            }
    assert {USAGE, "/api/account/usage", "/api/v1/admin/plans"} <= limited
    description = spec["info"]["description"]
    assert "rate_limited" in description
    assert "TALLY_API_RATE_PER_S" in description
