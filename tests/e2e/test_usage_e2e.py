"""Both usage endpoints, end to end, against answers computed here from the raw events.

Simulated gateways publish nine days of seeded traffic (bursty requests, streams
that close, never close, or opened recently and still running, re-sent
duplicates, junk) through the producer library into real Kafka; the faust
worker rolls it up into ClickHouse; the API (its clock pinned to the test's
`now`) answers for every account. The expectation below re-implements the
documented rules from scratch, on the events themselves, not on the rollups:
- a first_request window starts at the minute of the first request, at or
  before now, at or after the end of the previous window, and lasts its length;
- fixed sessions are epoch-aligned blocks; fixed weeks start Monday 00:00 UTC;
- units in a window are those of requests and closed streams whose event time
  falls in it; percentages round half-up to one decimal;
- a stream is active when opened or re-announced within the idle timeout and
  never closed.
"""

from __future__ import annotations

import asyncio
import calendar
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.rollup_table import RollupStore
from schemas.store import Store

pytestmark = pytest.mark.e2e

IDLE = timedelta(minutes=15)
# A plan with the other anchorings, so both code paths meet real data.
CUSTOM_PLANS = {
    "team": {
        "session_hours": 2,
        "session_limit": 40,
        "session_anchor": "fixed",
        "weekly_limit": 300,
        "weekly_anchor": "first_request",
        "per_minute": 20,
        "max_streams": 3,
    }
}
PLAN_LIMITS = {
    "free": (5, 100, "first_request", 1_000, "fixed", 60, 2),
    "pro": (5, 1_000, "first_request", 10_000, "fixed", 300, 10),
    "max": (5, 5_000, "first_request", 50_000, "fixed", 1_000, 50),
    "team": (2, 40, "fixed", 300, "first_request", 20, 3),
}


@dataclass
class Account:
    id: str
    plan: str
    anchor_day: int
    quiet: bool
    """No request for the last six hours: no first_request session is running."""


def _floor_minute(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(second=0, microsecond=0)


def _traffic(rng: random.Random, accounts: list[Account], now: datetime) -> list[Any]:
    made: list[Any] = []
    start = now - timedelta(days=9)
    for account in accounts:
        source = f"gw-{rng.randrange(3)}"
        t = start + timedelta(minutes=rng.randrange(600))
        until = now - timedelta(hours=6) if account.quiet else now - timedelta(minutes=1)
        # Bursts separated by gaps of minutes to days: sessions open and lapse.
        while t < until:
            for _ in range(rng.randrange(1, 12)):
                made.append(
                    build.request(
                        account.id,
                        source,
                        units=rng.choice([1.0, 2.5, 0.125]),
                        route="/v1/messages",
                        status=200,
                        time=t,
                    )
                )
                t += timedelta(seconds=rng.randrange(1, 400))
            t += timedelta(minutes=rng.choice([3, 45, 200, 290, 301, 700, 2_000]))
        if account.id == "e2e-003":
            # Over the session limit (may exceed 100 %) and the per-minute limit
            # (remaining stops at 0) in the current minute.
            made.extend(build.request(account.id, source, units=2.5, time=now) for _ in range(40))
        if not account.quiet:
            # The current minute, and one event a little ahead of the clock.
            made.append(
                build.request(account.id, source, units=3.0, time=now - timedelta(seconds=5))
            )
            made.append(
                build.request(account.id, source, units=1.0, time=now + timedelta(minutes=2))
            )
        # Streams: closed with cost, abandoned long ago, and running now.
        for n in range(rng.randrange(1, 4)):
            opened = now - timedelta(minutes=rng.randrange(20, 6_000))
            made.append(build.stream_opened(account.id, source, f"{account.id}-c{n}", time=opened))
            made.append(
                build.stream_closed(
                    account.id,
                    source,
                    f"{account.id}-c{n}",
                    units=rng.choice([0.0, 4.0, 12.5]),
                    time=opened + timedelta(minutes=rng.randrange(1, 10)),
                )
            )
        made.append(
            build.stream_opened(
                account.id, source, f"{account.id}-stale", time=now - timedelta(minutes=40)
            )
        )
        for n in range(rng.randrange(0, 4)):
            stream = f"{account.id}-live{n}"
            made.append(
                build.stream_opened(
                    account.id, source, stream, time=now - timedelta(minutes=rng.randrange(1, 14))
                )
            )
            if n == 0:  # a re-announcement refreshes the idle timeout
                made.append(
                    build.stream_opened(
                        account.id, source, stream, time=now - timedelta(seconds=30)
                    )
                )
    return made


def _billing_start(now: datetime, anchor: int) -> datetime:
    def start_in(year: int, month: int) -> datetime:
        day = min(anchor, calendar.monthrange(year, month)[1])
        return datetime(year, month, day, tzinfo=UTC)

    this = start_in(now.year, now.month)
    if now >= this:
        return this
    year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    return start_in(year, month)


def _next_billing_start(start: datetime, anchor: int) -> datetime:
    year, month = (start.year, start.month + 1) if start.month < 12 else (start.year + 1, 1)
    day = min(anchor, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _pct(units: Decimal, limit: float) -> float:
    return float((units * 100 / Decimal(repr(limit))).quantize(Decimal("0.1"), ROUND_HALF_UP))


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _first_request_window(
    minutes: list[datetime], length: timedelta, now: datetime
) -> tuple[datetime, datetime] | None:
    start: datetime | None = None
    for minute in sorted(set(m for m in minutes if m <= now)):
        if start is None or minute >= start + length:
            start = minute
    if start is not None and start <= now < start + length:
        return start, start + length
    return None


def _expected(account: Account, events: list[Any], now: datetime) -> dict[str, Any]:
    hours, s_limit, s_anchor, w_limit, w_anchor, per_minute, max_streams = PLAN_LIMITS[account.plan]
    requests = [e for e in events if e.type == "tally.request.v1"]
    costly = [e for e in events if e.type in ("tally.request.v1", "tally.stream.closed.v1")]
    request_minutes = [_floor_minute(e.time) for e in requests]

    def units_in(window: tuple[datetime, datetime] | None) -> Decimal:
        if window is None:
            return Decimal(0)
        return sum(
            (
                Decimal(repr(e.data.units))
                for e in costly
                if window[0] <= _floor_minute(e.time) < window[1]
            ),
            Decimal(0),
        )

    def count_in(lo: datetime, hi: datetime) -> int:
        return sum(1 for m in request_minutes if lo <= m < hi)

    session_len = timedelta(hours=hours)
    if s_anchor == "fixed":
        epoch_s = (
            int(now.timestamp())
            // int(session_len.total_seconds())
            * int(session_len.total_seconds())
        )
        start = datetime.fromtimestamp(epoch_s, UTC)
        session: tuple[datetime, datetime] | None = (start, start + session_len)
    else:
        session = _first_request_window(request_minutes, session_len, now)
    monday = (now - timedelta(days=now.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    if w_anchor == "fixed":
        weekly: tuple[datetime, datetime] | None = (monday, monday + timedelta(days=7))
    else:
        weekly = _first_request_window(request_minutes, timedelta(days=7), now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    this_minute = _floor_minute(now)
    period_start = _billing_start(now, account.anchor_day)
    period_end = _next_billing_start(period_start, account.anchor_day)

    opened: dict[str, datetime] = {}
    closed: set[str] = set()
    for e in events:
        if e.type == "tally.stream.opened.v1":
            opened[e.data.stream_id] = max(e.time, opened.get(e.data.stream_id, e.time))
        elif e.type == "tally.stream.closed.v1":
            closed.add(e.data.stream_id)
    active = sum(1 for s, t in opened.items() if s not in closed and t > now - IDLE)
    in_minute = count_in(this_minute, this_minute + timedelta(minutes=1))

    return {
        "summary": {
            "session": {
                "used_percentage": _pct(units_in(session), s_limit),
                "resets_at": _iso(session[1]) if session else None,
            },
            "weekly": {
                "used_percentage": _pct(units_in(weekly), w_limit),
                "resets_at": _iso(weekly[1]) if weekly else None,
            },
            "plan": account.plan,
        },
        "v1": {
            "requests": {
                "today": count_in(midnight, midnight + timedelta(days=1)),
                "this_week": count_in(monday, monday + timedelta(days=7)),
                "this_month": count_in(period_start, period_end),
                "limit": {
                    "per_minute": per_minute,
                    "remaining": max(0, per_minute - in_minute),
                    "resets_at": _iso(this_minute + timedelta(minutes=1)),
                },
            },
            "streams": {"active": active, "max": max_streams},
            "period": {"start": _iso(period_start), "end": _iso(period_end - timedelta(seconds=1))},
        },
    }


def oracle_accounts(rng: random.Random, count: int) -> list[Account]:
    """Every plan in turn, billing anchors 1, 15 and 31, every fifth account quiet."""
    plans = ["free", "pro", "max", "team"]
    return [
        Account(f"e2e-{i:03d}", plans[i % 4], rng.choice([1, 1, 15, 31]), i % 5 == 4)
        for i in range(count)
    ]


def register(store: Store, accounts: list[Account]) -> dict[str, str]:
    """Each account created in the store with a key of its own; returns id -> key."""
    directory = AccountStore(store)
    keys = {}
    for account in accounts:
        directory.create(account.id, account.plan, account.anchor_day)
        keys[account.id], _ = directory.create_key(account.id, admin=False)
    return keys


def oracle_api_settings(settings: WorkerSettings, **extra: Any) -> ApiSettings:
    """An API on the pipeline's store and topic with CUSTOM_PLANS."""
    return ApiSettings(
        events_topic=settings.events_topic,
        clickhouse_url=settings.clickhouse_url,
        clickhouse_database=settings.clickhouse_database,
        plans=orjson.dumps(CUSTOM_PLANS).decode(),
        **extra,
    )


async def read_as_expected(
    client: httpx.AsyncClient, key: str, want: dict[str, Any], now: datetime, account: Account
) -> httpx.Response:
    """Both usage endpoints answer `want` (from `_expected`) with everything counted up
    to `now`; returns the v1 answer for further checks."""
    summary = await client.get("/api/account/usage", headers={"Authorization": f"Bearer {key}"})
    assert summary.status_code == 200, summary.text
    assert summary.json() == want["summary"], account
    v1 = await client.get("/api/v1/account/usage", headers={"X-API-Key": key})
    assert v1.status_code == 200, v1.text
    assert v1.json()["data"] == want["v1"], account
    assert v1.json()["meta"]["updated_at"] == _iso(now)  # everything published is counted
    return v1


@pytest.fixture
async def stack(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> AsyncIterator[tuple[WorkerSettings, Store, Any]]:
    async with running_pipeline(pipeline_settings, pipeline_store) as (worker, _):
        yield pipeline_settings, pipeline_store, worker


async def _wait_until_consumed(settings: WorkerSettings, store: Store) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.events_topic, p) for p in range(8)]
        ends = {tp.partition: off for tp, off in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()
    sink = RollupStore(store)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = await asyncio.to_thread(sink.resume_offsets, settings.events_topic)
        if all(done.get(p, 0) >= end for p, end in ends.items()):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"worker did not consume everything: {done} < {ends}")


async def test_both_endpoints_equal_values_computed_from_raw_events(
    stack: tuple[WorkerSettings, Store, Any], kafka_bootstrap: str
) -> None:
    settings, store, _ = stack
    rng = random.Random(9_2026)
    now = datetime.now(UTC)
    accounts = oracle_accounts(rng, 48)
    events = _traffic(rng, accounts, now)

    async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
        for i, event in enumerate(events):
            await (gateway.send_single(event) if i % 17 == 0 else gateway.record(event))
        for event in rng.sample(events, len(events) // 20):  # gateway retries
            await gateway.record(event)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        for junk in (b"{", b"[1,2]", orjson.dumps({"specversion": "1.0", "subject": "e2e-000"})):
            await raw.send_and_wait(settings.events_topic, junk, key=b"e2e-000")
    finally:
        await raw.stop()
    await _wait_until_consumed(settings, store)

    keys = register(store, accounts)
    api = create_app(oracle_api_settings(settings), store, now=lambda: now)
    by_account: dict[str, list[Any]] = {a.id: [] for a in accounts}
    for event in events:
        by_account[event.subject].append(event)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://tally"
    ) as client:
        for account in accounts:
            want = _expected(account, by_account[account.id], now)
            v1 = await read_as_expected(client, keys[account.id], want, now, account)
            limit = want["v1"]["requests"]["limit"]
            assert v1.headers["X-RateLimit-Limit"] == str(limit["per_minute"])
            assert v1.headers["X-RateLimit-Remaining"] == str(limit["remaining"])
            reset = _floor_minute(now) + timedelta(minutes=1)
            assert v1.headers["X-RateLimit-Reset"] == str(int(reset.timestamp()))
            assert v1.headers["X-Data-Delay"] == "0.000"
            assert v1.headers["X-Request-Id"]

        # One account's key never reads another's data, by any endpoint.
        other = accounts[1].id
        for path in ("/api/account/usage", "/api/v1/account/usage"):
            mine = await client.get(
                path, headers={"X-API-Key": keys[accounts[0].id]}, params={"account": other}
            )
            assert (
                mine.json()
                == (await client.get(path, headers={"X-API-Key": keys[accounts[0].id]})).json()
            )
        for headers in (
            {},
            {"X-API-Key": "tly_000000000000_" + "x" * 32},
            {"Authorization": "Bearer nonsense"},
        ):
            denied = await client.get("/api/v1/account/usage", headers=headers)
            assert denied.status_code == 401
            assert denied.json()["error"]["code"] == "unauthorized"
            assert denied.json()["error"]["message"] == "Invalid or missing API key"

    # Sanity: the traffic really exercised the edges the expectation handles.
    answers = [_expected(a, by_account[a.id], now) for a in accounts]
    assert any(x["summary"]["session"]["resets_at"] is None for x in answers)
    assert any(x["summary"]["session"]["used_percentage"] > 100 for x in answers)
    assert any(x["v1"]["streams"]["active"] > 0 for x in answers)
    assert any(x["v1"]["requests"]["limit"]["remaining"] == 0 for x in answers)
