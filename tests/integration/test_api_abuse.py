"""The API under abuse, on the real app and a real store (query_api/guard.py and the
limits of issue 16): bodies are refused before they are read, keys are checked
before bodies, revocations cannot lose to a clock, keys are never cached.

Some requests are driven as raw ASGI calls, so a test can see how much of a body
the app asked for: `receive` is the only way an ASGI app reads one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from query_api.accounts import AccountStore
from query_api.app import create_app, new_view
from query_api.keys import hash_key
from query_api.settings import ApiSettings
from schemas.store import Store

pytestmark = pytest.mark.integration

ADMIN_KEY = "abuse-admin-key-0123456789abcdef"
LIMIT = 4096  # TALLY_API_MAX_BODY_BYTES in these tests
ACCOUNTS = "/api/v1/admin/accounts"
KEYS = "/api/v1/admin/keys"
USAGE = "/api/v1/account/usage"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Call:
    """One raw ASGI call: the answer, and how many body messages the app read."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reads: int = 0

    def error_code(self) -> str:
        code: str = json.loads(self.body)["error"]["code"]
        return code


@dataclass
class Api:
    app: Any
    store: Store
    keys: dict[str, str]
    clock: FakeClock

    async def call(
        self,
        path: str,
        headers: dict[str, str],
        chunks: list[bytes],
        content_length: int | None = None,
        method: str = "POST",
    ) -> Call:
        """`chunks` as the body (chunked unless `content_length` is given)."""
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"content-type", b"application/json"))
        if content_length is None:
            raw.append((b"transfer-encoding", b"chunked"))
        else:
            raw.append((b"content-length", str(content_length).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": raw,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        result = Call()
        pending = list(chunks)

        async def receive() -> dict[str, Any]:
            result.reads += 1
            if not pending:
                return {"type": "http.disconnect"}
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                result.status = message["status"]
                result.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                result.body += message.get("body", b"")

        await self.app(scope, receive, send)
        return result


@pytest.fixture
def api(store: Store, store_url: str) -> Api:
    accounts = AccountStore(store)
    accounts.create("acme", "pro")
    keys = {"acme": accounts.create_key("acme", admin=False)[0]}
    keys["admin"] = accounts.create_key(None, admin=True)[0]
    settings = ApiSettings(
        admin_key=ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=store.database,
        api_max_body_bytes=LIMIT,
        api_rate_burst=3,
        api_rate_per_s=1.0,
    )
    clock = FakeClock()
    app = create_app(settings, store, rate_clock=clock)
    return Api(app, store, keys, clock)


def account_body(account_id: str, size: int = 0) -> bytes:
    body = json.dumps({"id": account_id, "plan": "pro"}).encode()
    return body + b" " * max(0, size - len(body))  # JSON allows trailing whitespace


def assert_envelope(call: Call, status: int, code: str) -> str:
    assert call.status == status, call.body
    body = json.loads(call.body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "docs"}
    assert body["error"]["code"] == code
    assert call.headers["x-request-id"]
    message: str = body["error"]["message"]
    return message


# -- bodies over the limit -----------------------------------------------------------


async def test_a_declared_length_over_the_limit_is_413_before_a_byte_is_read(api: Api) -> None:
    for who in ({"x-api-key": ADMIN_KEY}, {}):
        call = await api.call(ACCOUNTS, who, [account_body("big", 100 * LIMIT)], 100 * LIMIT)
        message = assert_envelope(call, 413, "payload_too_large")
        assert f"over {LIMIT} bytes (TALLY_API_MAX_BODY_BYTES)" in message
        assert call.headers["connection"] == "close"
        assert call.reads == 0


async def test_a_chunked_body_is_counted_and_refused_once_it_passes_the_limit(api: Api) -> None:
    chunks = [b" " * 1024] * 64  # 64 KiB of whitespace, 1 KiB at a time, no length
    chunks[-1] = account_body("chunked")
    call = await api.call(ACCOUNTS, {"x-api-key": ADMIN_KEY}, chunks)
    assert_envelope(call, 413, "payload_too_large")
    assert call.headers["connection"] == "close"
    # Read up to the first chunk past the limit, not one more.
    assert call.reads == LIMIT // 1024 + 1
    # An under-declared length is counted the same way.
    lied = await api.call(ACCOUNTS, {"x-api-key": ADMIN_KEY}, chunks, content_length=10)
    assert_envelope(lied, 413, "payload_too_large")
    assert lied.reads == LIMIT // 1024 + 1


async def test_a_body_within_the_limit_is_read_and_served(api: Api) -> None:
    call = await api.call(
        ACCOUNTS, {"x-api-key": ADMIN_KEY}, [account_body("fits", LIMIT)], content_length=LIMIT
    )
    assert call.status == 201, call.body
    assert json.loads(call.body)["data"]["id"] == "fits"
    chunked = await api.call(
        ACCOUNTS, {"x-api-key": ADMIN_KEY}, [b" " * 1000, account_body("fits-chunked")]
    )
    assert chunked.status == 201, chunked.body


# -- keys before bodies -----------------------------------------------------------------


async def test_admin_routes_refuse_bad_keys_without_reading_the_body(api: Api) -> None:
    body = [account_body("nope", 2000)]
    for headers, status, code in [
        ({}, 401, "unauthorized"),
        ({"x-api-key": "tly_000000000000_" + "A" * 32}, 401, "unauthorized"),
        ({"authorization": f"Bearer {api.keys['acme']}"}, 403, "forbidden"),
    ]:
        for method, path in (("POST", ACCOUNTS), ("POST", KEYS), ("PUT", f"{ACCOUNTS}/acme")):
            api.clock.now += 10  # a full rate-limit bucket for each
            call = await api.call(path, headers, body, content_length=2000, method=method)
            assert_envelope(call, status, code)
            assert call.reads == 0, (path, headers)
            assert call.headers["connection"] == "close"
    assert AccountStore(api.store).get("nope") is None


async def test_a_caller_checked_before_the_body_is_charged_once(api: Api) -> None:
    # Burst 3, no refill (the clock stands still): three creations, then 429.
    statuses = []
    for i in range(4):
        call = await api.call(
            ACCOUNTS, {"x-api-key": api.keys["admin"]}, [account_body(f"a{i}")], None
        )
        statuses.append(call.status)
    assert statuses == [201, 201, 201, 429]


# -- keys are never cached --------------------------------------------------------------


async def test_answers_carrying_a_key_are_not_to_be_stored(api: Api) -> None:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        admin = {"X-API-Key": ADMIN_KEY}
        created = await client.post(ACCOUNTS, json={"id": "cached"}, headers=admin)
        assert created.status_code == 201
        assert created.json()["data"]["api_key"]
        assert created.headers["cache-control"] == "no-store"
        key = await client.post(KEYS, json={"account": "cached"}, headers=admin)
        assert key.status_code == 201
        assert key.headers["cache-control"] == "no-store"
        schema = (await client.get("/openapi.json")).json()
    for path in (ACCOUNTS, KEYS):
        post = schema["paths"][path]["post"]["responses"]
        assert "Cache-Control" in post["201"]["headers"]
        assert post["413"]["content"]["application/json"]


# -- revocations and clocks -------------------------------------------------------------


def test_a_revocation_wins_over_a_key_row_from_a_clock_ahead(store: Store) -> None:
    accounts = AccountStore(store)
    accounts.create("acme", "pro")
    key, info = accounts.create_key("acme", admin=False)
    # The key's row as written by a host whose clock was a day ahead (since stepped
    # back): its version is in the future of every clock reading from now on.
    ahead = time.time_ns() + int(timedelta(days=1).total_seconds() * 1e9)
    created = datetime.now(UTC)
    store.insert(
        "api_keys",
        [[info.prefix, hash_key(key), "acme", False, created, None, ahead]],
        ["prefix", "key_hash", "account", "is_admin", "created_at", "revoked_at", "version"],
    )
    assert accounts.authenticate(key) is not None
    assert accounts.revoke_key(info.prefix)
    # After a restart: a fresh adapter, and a freshly loaded usage view.
    assert AccountStore(store).authenticate(key) is None
    settings = ApiSettings(clickhouse_database=store.database)
    view = new_view(settings, store, lambda: datetime.now(UTC))
    if view is not None:  # the embedded store: the view serves key checks
        view.load(store)
        assert view.authenticate(key) is None
    [listed] = AccountStore(store).keys("acme")
    assert listed.revoked_at is not None


def test_a_plan_change_wins_over_an_account_row_from_a_clock_ahead(store: Store) -> None:
    accounts = AccountStore(store)
    account = accounts.create("acme", "free")
    ahead = time.time_ns() + int(timedelta(days=1).total_seconds() * 1e9)
    store.insert(
        "accounts",
        [["acme", "free", 1, account.created_at, account.created_at, ahead]],
        ["id", "plan", "billing_anchor_day", "created_at", "updated_at", "version"],
    )
    accounts.set_plan("acme", "pro")
    found = AccountStore(store).get("acme")
    assert found is not None
    assert found.plan == "pro"


# -- a well-behaved client among abusive ones -------------------------------------------


async def test_a_well_behaved_client_keeps_its_answers_under_abuse(
    store: Store, store_url: str
) -> None:
    accounts = AccountStore(store)
    accounts.create("good", "pro")
    good_key = accounts.create_key("good", admin=False)[0]
    settings = ApiSettings(
        admin_key=ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=store.database,
        api_max_body_bytes=LIMIT,
        # More than the good client needs, less than the guessers spend.
        api_rate_burst=50,
        api_rate_per_s=1.0,
        # Refusals at once (not held, query_api/refusals.py): the abusers at full speed.
        api_refusal_delay_s=0.0,
    )
    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)  # every caller on one address, as via a proxy
    since = (datetime.now(UTC) - timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    abusive: list[int] = []

    async def oversized(client: httpx.AsyncClient) -> None:
        for _ in range(10):
            r = await client.post(ACCOUNTS, content=b" " * (LIMIT * 4), headers={})
            abusive.append(r.status_code)

    async def guesser(client: httpx.AsyncClient) -> None:
        for i in range(30):
            r = await client.get(USAGE, headers={"X-API-Key": f"tly_{i:012x}_" + "B" * 32})
            abusive.append(r.status_code)

    async def analyst(client: httpx.AsyncClient) -> None:
        params = {"from": since, "to": until, "window": "hour", "group_by": "route,model"}
        for _ in range(5):
            r = await client.get(
                "/api/v1/analytics/usage", params=params, headers={"X-API-Key": ADMIN_KEY}
            )
            abusive.append(r.status_code)

    async def good(client: httpx.AsyncClient) -> list[httpx.Response]:
        answers = []
        for _ in range(40):
            answers.append(await client.get(USAGE, headers={"X-API-Key": good_key}))
            await asyncio.sleep(0)
        return answers

    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        results = await asyncio.gather(
            good(client), oversized(client), guesser(client), analyst(client), guesser(client)
        )
    answers = results[0]
    assert [a.status_code for a in answers] == [200] * 40
    assert all(a.json()["data"]["requests"]["limit"]["per_minute"] for a in answers)
    assert len(abusive) == 10 + 30 + 5 + 30
    assert set(abusive) <= {200, 401, 413, 429}
    assert 413 in abusive
    assert 429 in abusive
