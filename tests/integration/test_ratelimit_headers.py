"""docs/api.md#rate-limit-headers on the real app and a real store: the IETF
RateLimit-Policy / RateLimit fields of both usage endpoints and of every 429 the API returns, read
with the tests' own RFC 9651 parser (tests/structured_fields.py, not the library that
writes them) and checked against X-RateLimit-* and the body.

Rollup rows are written to the store as the sink writes them, around a pinned clock:
requests in the current minute count, those of the minute before and of a minute ahead
(events may be ahead of the clock) do not, so the minute reported is the minute
counted. Every check runs on the fast path and through the router.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from fastapi import FastAPI

from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import COLUMNS
from schemas.store import Store
from tests.structured_fields import InnerList, Item, Token, parse_list

pytestmark = pytest.mark.integration

V1 = "/api/v1/account/usage"
V0 = "/api/account/usage"
# 47.25 s into the minute: 12.75 s to its end, which `t` rounds up to 13.
NOW = datetime(2026, 2, 8, 14, 44, 47, 250_000, tzinfo=UTC)
MINUTE = NOW.replace(second=0, microsecond=0)
PLANS = {
    "tiny": {"per_minute": 5, "max_streams": 1},
    "batch": {"per_minute": 100, "max_streams": 0},
}
BURST, RATE = 3, 0.5
# account -> (plan, requests this minute, streams left open, streams opened and closed)
ACCOUNTS = {
    "acme": ("pro", 13, 2, 1),  # the contract's example: r=287, t=13, streams r=8
    "busy": ("tiny", 9, 3, 0),  # over both limits: remaining stays 0
    "batch": ("batch", 4, 0, 0),  # streaming not enabled
    "quiet": ("free", 0, 0, 0),
}
FIELDS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
IETF = ("RateLimit-Policy", "RateLimit")


def _request_row(account: str, minute: datetime, events: int) -> list[object]:
    return [account, minute, REQUEST, "/v1/messages", "POST", "small-1", 200, "", events,
            events * 1_000_000, 10.0 * events, 100 * events, 100 * events, minute, 0]  # fmt: skip


def _stream_row(account: str, kind: str, stream_id: str) -> list[object]:
    at = NOW - timedelta(seconds=20)
    return [account, MINUTE, kind, "/v1/messages", "", "", 0, stream_id, 1, 0, 0.0, 0, 0, at,
            0]  # fmt: skip


@pytest.fixture
def keys(store: Store) -> dict[str, str]:
    accounts = AccountStore(store)
    found: dict[str, str] = {}
    rows: list[list[object]] = []
    for account, (plan, requests, open_streams, closed_streams) in ACCOUNTS.items():
        accounts.create(account, plan)
        found[account], _ = accounts.create_key(account, admin=False)
        if requests:
            rows.append(_request_row(account, MINUTE, requests))
        # Neighbouring minutes are full, and must not count against this one.
        rows.append(_request_row(account, MINUTE - timedelta(minutes=1), 1_000))
        rows.append(_request_row(account, MINUTE + timedelta(minutes=1), 1_000))
        for n in range(open_streams):
            rows.append(_stream_row(account, STREAM_OPENED, f"{account}-open-{n}"))
        for n in range(closed_streams):
            rows.append(_stream_row(account, STREAM_OPENED, f"{account}-done-{n}"))
            rows.append(_stream_row(account, STREAM_CLOSED, f"{account}-done-{n}"))
    store.insert("rollup_minute", rows, COLUMNS)
    return found


def make_app(store: Store, fast_path: bool) -> FastAPI:
    settings = ApiSettings(
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        plans=orjson.dumps(PLANS).decode(),
        api_rate_per_s=RATE,
        api_rate_burst=BURST,
        # Refusals at once: these tests step the limiter's clock themselves.
        api_refusal_delay_s=0.0,
    )
    # The limiter's clock stands still: only the requests a test makes spend tokens.
    return create_app(settings, store, now=lambda: NOW, rate_clock=lambda: 0.0, fast_path=fast_path)


@asynccontextmanager
async def client(app: FastAPI, ip: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
        yield c


def policies(response: httpx.Response, field: str) -> dict[str, dict[str, object]]:
    """The field as RFC 9651 parses it: policy name -> parameters. Exactly one field
    line, every member an Item named by an sf-string, each name once."""
    assert len(response.headers.get_list(field)) == 1, response.headers
    members = parse_list(response.headers[field])
    named: dict[str, dict[str, object]] = {}
    for member in members:
        assert not isinstance(member, InnerList), member
        assert isinstance(member, Item)
        name = member.value
        assert isinstance(name, str), member
        assert not isinstance(name, Token), member
        assert name not in named, members
        named[name] = dict(member.params)
    return named


def reset_in(reset_epoch: int) -> int:
    """`t` for a reset at `reset_epoch`, seen at NOW: rounded up (docs/api.md says so)."""
    return math.ceil(reset_epoch - NOW.timestamp())


def check_plan_fields(response: httpx.Response, per_minute: int, max_streams: int) -> None:
    """The §7 fields of a usage answer against X-RateLimit-* and the plan."""
    assert response.status_code == 200, response.text
    limit, remaining, reset = (int(response.headers[name]) for name in FIELDS)
    assert limit == per_minute
    assert 0 <= remaining <= limit
    assert reset % 60 == 0
    assert 0 < reset - NOW.timestamp() <= 60
    assert policies(response, "RateLimit-Policy") == {
        "minute": {"q": per_minute, "w": 60},
        "streams": {"q": max_streams, "qu": "concurrent-requests"},
    }
    state = policies(response, "RateLimit")
    assert set(state) == {"minute", "streams"}
    assert state["minute"] == {"r": remaining, "t": reset_in(reset)}
    assert set(state["streams"]) == {"r"}
    streams_left = state["streams"]["r"]
    assert isinstance(streams_left, int)
    assert 0 <= streams_left <= max_streams


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "router"])
async def test_usage_fields_agree_with_x_ratelimit_and_the_body(
    store: Store, keys: dict[str, str], fast_path: bool
) -> None:
    app = make_app(store, fast_path)
    seen: dict[str, dict[str, str]] = {}
    for account, (plan_name, requests, open_streams, _) in ACCOUNTS.items():
        # A client address per account: each key and address has a bucket to spend.
        async with client(app, f"10.3.0.{len(seen) + 1}") as c:
            v1 = await c.get(V1, headers={"X-API-Key": keys[account]})
            v0 = await c.get(V0, headers={"Authorization": f"Bearer {keys[account]}"})
        data = v1.json()["data"]
        plan = plans_of(app)[plan_name]
        check_plan_fields(v1, plan["per_minute"], plan["max_streams"])
        check_plan_fields(v0, plan["per_minute"], plan["max_streams"])
        # One instant, one account: both endpoints report the same limits.
        assert {k: v0.headers[k] for k in FIELDS + IETF} == {
            k: v1.headers[k] for k in FIELDS + IETF
        }
        # ... and the body says what the headers say.
        limit = data["requests"]["limit"]
        state = policies(v1, "RateLimit")
        assert limit["per_minute"] == int(v1.headers["X-RateLimit-Limit"])
        assert limit["remaining"] == int(v1.headers["X-RateLimit-Remaining"])
        assert limit["remaining"] == state["minute"]["r"]
        resets_at = datetime.fromisoformat(limit["resets_at"])
        assert resets_at.timestamp() == int(v1.headers["X-RateLimit-Reset"])
        streams = data["streams"]
        assert streams["max"] == policies(v1, "RateLimit-Policy")["streams"]["q"]
        assert state["streams"]["r"] == max(0, streams["max"] - streams["active"])
        # The counts are the current minute's, the streams those left open.
        assert limit["remaining"] == max(0, plan["per_minute"] - requests)
        assert streams["active"] == open_streams
        seen[account] = {k: v1.headers[k] for k in IETF}
    assert seen["acme"] == {
        "RateLimit-Policy": '"minute";q=300;w=60, "streams";q=10;qu="concurrent-requests"',
        "RateLimit": '"minute";r=287;t=13, "streams";r=8',
    }
    # Over both limits: never below 0.
    assert seen["busy"]["RateLimit"] == '"minute";r=0;t=13, "streams";r=0'
    # Streaming not enabled: the policy is stated, with nothing allowed.
    assert seen["batch"] == {
        "RateLimit-Policy": '"minute";q=100;w=60, "streams";q=0;qu="concurrent-requests"',
        "RateLimit": '"minute";r=96;t=13, "streams";r=0',
    }


def plans_of(app: FastAPI) -> dict[str, dict[str, int]]:
    """The app's plans (TALLY_PLANS applied): what the fields must state."""
    plans = app.state.services.plans
    return {name: {"per_minute": p.per_minute, "max_streams": p.max_streams}
            for name, p in plans.items()}  # fmt: skip


def check_refusal(response: httpx.Response) -> None:
    """A 429 from the API's own limit: the §7 fields describe that limit alone."""
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    limit, remaining, reset = (int(response.headers[name]) for name in FIELDS)
    assert (limit, remaining) == (BURST, 0)
    # The limit that refused: BURST requests, refilled from empty in BURST / RATE s.
    assert policies(response, "RateLimit-Policy") == {
        "api": {"q": BURST, "w": math.ceil(BURST / RATE)}
    }
    assert policies(response, "RateLimit") == {"api": {"r": 0, "t": reset_in(reset)}}
    # The bucket is full again BURST / RATE seconds from now (the limiter's clock
    # stands still between requests), which X-RateLimit-Reset rounds up.
    assert reset == math.ceil(NOW.timestamp() + BURST / RATE)
    assert int(response.headers["Retry-After"]) <= reset_in(reset)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "router"])
async def test_every_429_carries_the_limit_that_refused_it(
    store: Store, keys: dict[str, str], fast_path: bool
) -> None:
    app = make_app(store, fast_path)
    acme = {"X-API-Key": keys["acme"]}
    async with client(app, "10.4.0.1") as c:
        for _ in range(BURST):
            assert (await c.get(V1, headers=acme)).status_code == 200
        # Every usage endpoint shares the key's bucket.
        check_refusal(await c.get(V1, headers=acme))
        check_refusal(await c.get(V0, headers={"Authorization": f"Bearer {keys['acme']}"}))
    # Without a valid key the client address is limited: the same policy, refused alike.
    async with client(app, "10.4.0.2") as c:
        for _ in range(BURST):
            assert (await c.get(V1)).status_code == 401
        check_refusal(await c.get(V1))
        check_refusal(await c.get(V1, headers=acme))
