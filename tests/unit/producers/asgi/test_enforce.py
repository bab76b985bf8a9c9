"""MeteringMiddleware with enforcement: refusals before the app runs (fake recorder;
the Tally answer is applied by hand, the sync task finds no API and fails open)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import pytest

from producers.asgi import MeteringMiddleware, from_state
from producers.enforcement import Quota, Synced
from producers.enforcement_sync import Enforcement
from tests.structured_fields import parse_list
from tests.unit.producers.asgi.fakes import ACCOUNT, FakeRecorder, make_app, metered

NO_API = "http://127.0.0.1:9"  # the discard port: nothing answers


@pytest.fixture
async def enforcement() -> AsyncIterator[Enforcement]:
    e = Enforcement(NO_API, "admin-key", stale_after_s=600, timeout_s=0.2)
    yield e
    await e.aclose()


def synced(requests: int, per_minute: int = 5, *, used: int = 0, active: int = 0) -> Synced:
    now = time.time()
    return Synced(
        per_minute=per_minute,
        minute_start=now // 60 * 60,
        minute_requests=requests,
        session=Quota(used, 10.0, now + 3600),
        weekly=Quota(used, 100.0, now + 86_400),
        active_streams=active,
        max_streams=1,
        reflected_until=now - 60,
    )


async def test_over_the_minute_limit_is_a_429_and_the_app_does_not_run(
    recorder: FakeRecorder, enforcement: Enforcement
) -> None:
    enforcement.core.apply("acct-1", synced(requests=5), time.time())
    async with metered(recorder, enforcement=enforcement) as (client, middleware):
        response = await client.get("/v1/items/7", headers=ACCOUNT)
        await middleware.drain(2)
    assert response.status_code == 429
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "rate_limited"
    assert error["docs"].endswith("#enforcing-plans")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Limit"] == "5"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    [minute, streams] = parse_list(response.headers["RateLimit"])
    assert (minute.value, minute.params["r"]) == ("minute", 0)
    assert 0 < int(minute.params["t"]) <= 60
    assert streams.params == {"r": 1}
    assert recorder.events == []  # refused calls are not metered
    assert middleware.stats.calls_refused == 1


async def test_admitted_calls_count_at_once_and_charge_their_units(
    recorder: FakeRecorder, enforcement: Enforcement
) -> None:
    enforcement.core.apply("acct-1", synced(requests=3), time.time())
    async with metered(recorder, enforcement=enforcement) as (client, middleware):
        assert (await client.post("/v1/messages", headers=ACCOUNT)).status_code == 200
        assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200
        assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 429
        await middleware.drain(2)
    state = enforcement.core.state("acct-1")
    assert sum(u.requests for u in state.uses) == 2
    assert state.units_micro == 3_500_000  # 2.5 + 1
    assert len(recorder.events) == 2


async def test_a_used_up_session_is_quota_exceeded(
    recorder: FakeRecorder, enforcement: Enforcement
) -> None:
    enforcement.core.apply("acct-1", synced(0, used=10_000_000), time.time())
    async with metered(recorder, enforcement=enforcement) as (client, _):
        response = await client.get("/v1/items/1", headers=ACCOUNT)
    assert response.status_code == 429
    assert orjson.loads(response.content)["error"]["code"] == "quota_exceeded"
    assert int(response.headers["Retry-After"]) > 3500


async def test_a_stream_over_max_streams_is_refused_a_plain_call_is_not(
    recorder: FakeRecorder, enforcement: Enforcement
) -> None:
    enforcement.core.apply("acct-1", synced(0, active=1), time.time())
    sse = {**ACCOUNT, "accept": "text/event-stream"}
    async with metered(recorder, enforcement=enforcement) as (client, _):
        response = await client.get("/v1/sse", headers=sse)
        assert response.status_code == 429
        assert orjson.loads(response.content)["error"]["code"] == "too_many_streams"
        assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200


async def test_an_account_never_synced_is_allowed_fail_open(
    recorder: FakeRecorder, enforcement: Enforcement
) -> None:
    async with metered(recorder, enforcement=enforcement) as (client, middleware):
        for _ in range(3):
            assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200
        await middleware.drain(2)
    assert enforcement.stats.unsynced_allowed == 3
    assert len(recorder.events) == 3


def test_from_state_cannot_enforce(recorder: FakeRecorder) -> None:
    enforcement = Enforcement(NO_API, "admin-key")
    with pytest.raises(ValueError, match="from_header"):
        MeteringMiddleware(
            make_app(),
            recorder=recorder,
            source="gw",
            account=from_state("account_id"),
            enforcement=enforcement,
        )
