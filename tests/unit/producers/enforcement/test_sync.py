"""The enforcement sync (producers/enforcement_sync.py) against a mocked limits route."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from producers.enforcement_sync import LIMITS_PATH, Enforcement, account_reflected, parse_account


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


def test_the_accounts_own_partition_decides_what_is_reflected() -> None:
    """Tally named the account's partition: its time, not the least over partitions."""
    body = {**_answer("2030-01-01T00:00:00.000Z", 1), "partition": 3,
            "partition_reflected_until": "2030-01-01T00:00:09.000Z"}  # fmt: skip
    assert account_reflected(body) == 1_893_456_009.0
    synced = parse_account(body)
    assert synced is not None
    assert synced.reflected_until == 1_893_456_009.0
    # Its partition has no marker yet: nothing of it is counted, whatever the others say.
    unmarked = {**body, "partition_reflected_until": None}
    assert account_reflected(unmarked) is None
    # An older Tally (or no partition count sent): the least over partitions.
    assert account_reflected(_answer("2030-01-01T00:00:00.000Z", 1)) == 1_893_456_000.5


class _Recorder:
    partitions = 0


async def test_sync_sends_the_recorders_partition_count_once_it_is_known() -> None:
    posted: list[dict[str, Any]] = []

    def route(request: httpx.Request) -> httpx.Response:
        posted.append(orjson.loads(request.content))
        return httpx.Response(200, json={"accounts": {"acme": None}})

    e = Enforcement("http://tally", "admin-key")
    recorder = _Recorder()
    e.learn_partitions_from(recorder)
    async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as client:
        e.core.admit("acme", time.time())
        await e.sync_once(client)  # the gateway has not connected: no count
        recorder.partitions = 8
        e.core.admit("acme", time.time())
        await e.sync_once(client)
    assert posted == [{"accounts": ["acme"]}, {"accounts": ["acme"], "partitions": 8}]
    # A recorder without a partition count (a test fake): the sync never sends one.
    other = Enforcement("http://tally", "admin-key")
    other.learn_partitions_from(object())
    assert other.partitions is None


def _limited(body: dict[str, Any], per_minute: int) -> dict[str, Any]:
    return {**body, "minute": {**body["minute"], "per_minute": per_minute}}


def test_one_lagging_partition_does_not_hold_other_accounts_uses() -> None:
    """acme (partition 0) is counted up to 00:00:20; bolt's partition 1 lags at 00:00:00.
    acme's five requests are in Tally's count, so they leave the local count; judged by
    the least over partitions (00:00:00) they stay and count twice: 10 of 10, refused
    at half the limit."""
    minute, lagging = "2030-01-01T00:00:00.000Z", "2030-01-01T00:00:00.000Z"
    start = 1_893_456_000.0
    answers = {
        "acme": {**_limited(_answer(minute, 5), 10), "reflected_until": lagging,
                 "partition": 0, "partition_reflected_until": "2030-01-01T00:00:20.000Z"},
        "bolt": {**_limited(_answer(minute, 0), 10), "reflected_until": lagging,
                 "partition": 1, "partition_reflected_until": lagging},
    }  # fmt: skip

    def run(answers: dict[str, dict[str, Any]]) -> Enforcement:
        e = Enforcement("http://tally", "admin-key", margin_s=2.0)
        for account, body in answers.items():
            for i in range(5):
                e.core.admit(account, start + 2 + i)
            e.core.apply(account, parse_account(body), start + 21)
        return e

    per_partition = run(answers)
    assert not per_partition.core.state("acme").uses  # Tally's 5 are these
    assert len(per_partition.core.state("bolt").uses) == 5  # not counted yet: kept
    for account in answers:
        assert per_partition.core.decide(account, start + 22) is None  # 5 of 10 each
    least = run({a: {**body, "partition": None} for a, body in answers.items()})
    assert len(least.core.state("acme").uses) == 5
    refusal = least.core.decide("acme", start + 22)
    assert refusal is not None
    assert refusal.code == "rate_limited"
