"""`GET /api/v1/account/usage` served past the router answers exactly as routed.

query_api/app.py's RequestMiddleware calls the hot route's ASGI app directly
(routes/usage.py `fast_routes`); `create_app(fast_path=False)` sends every request
through FastAPI's router instead. Two apps on one real store, one clock and one
rate-limit clock get the same requests (answers, errors, limits, odd methods and
paths) and must give byte-identical answers, access-log lines and histogram labels.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.events import REQUEST, STREAM_OPENED
from schemas.rollup_table import COLUMNS
from schemas.store import Store

pytestmark = pytest.mark.integration

USAGE = "/api/v1/account/usage"
NOW = datetime(2026, 3, 29, 12, 0, 30, 250_000, tzinfo=UTC)
ENV_ADMIN_KEY = "fast-path-admin-key-0123456789abc"
BURST = 4


@pytest.fixture
def keys(store: Store) -> dict[str, str]:
    accounts = AccountStore(store)
    found: dict[str, str] = {}
    for account, plan in (("acme", "pro"), ("globex", "free"), ("idle", "max")):
        accounts.create(account, plan)
        found[account], _ = accounts.create_key(account, admin=False)
    found["admin"], _ = accounts.create_key(None, admin=True)
    rows: list[list[object]] = []
    for account, minutes in (("acme", (0, 1, 7, 300, 2_000, 9_000)), ("globex", (0, 45, 90))):
        for back in minutes:
            minute = (NOW - timedelta(minutes=back)).replace(second=0, microsecond=0)
            events = 3 + back % 7
            rows.append(
                [account, minute, REQUEST, "/v1/messages", "POST", "small-1", 200, "", events,
                 events * 1_000_000, 120.0 * events, 300 * events, 900 * events, minute, 0]
            )  # fmt: skip
    opened = NOW.replace(second=0, microsecond=0)
    rows.append(
        ["acme", opened, STREAM_OPENED, "/v1/messages", "", "", 0, "s-1", 1, 0, 0.0, 0, 0,
         opened, 0]
    )  # fmt: skip
    store.insert("rollup_minute", rows, COLUMNS)
    return found


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _requests(keys: dict[str, str]) -> list[tuple[str, str, dict[str, str]]]:
    acme = {"X-API-Key": keys["acme"]}
    return [
        ("GET", USAGE, acme),
        ("GET", USAGE, {"Authorization": f"Bearer {keys['globex']}"}),
        ("GET", USAGE, {"X-API-Key": keys["idle"], "X-Request-Id": "caller-id-1"}),
        ("GET", USAGE, {**acme, "X-Request-Id": "not a valid id!"}),
        ("GET", USAGE, {}),
        ("GET", USAGE, {"X-API-Key": "tly_000000000000_" + "a" * 32}),
        ("GET", USAGE, {"X-API-Key": "garbage"}),
        ("GET", USAGE, {"X-API-Key": keys["admin"]}),
        ("GET", USAGE, {"X-API-Key": ENV_ADMIN_KEY}),
        ("GET", USAGE + "?window=day", acme),
        ("HEAD", USAGE, acme),
        ("POST", USAGE, acme),
        ("GET", USAGE + "/", acme),
        ("GET", "/api/account/usage", {"Authorization": f"Bearer {keys['acme']}"}),
        # Past the burst: 429 with Retry-After and the limit's headers.
        *[("GET", USAGE, acme)] * (BURST + 1),
    ]


def _without_generated_ids(headers: httpx.Headers, sent: dict[str, str]) -> list[Any]:
    raw = [(k.decode(), v.decode()) for k, v in headers.raw]
    if sent.get("X-Request-Id") == "caller-id-1":
        return raw
    # A fresh id per request: only its shape can be compared (a uuid4 in hex).
    ids = [v for k, v in raw if k == "x-request-id"]
    assert len(ids) == 1, raw
    assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", ids[0]), raw
    return [(k, "<id>" if k == "x-request-id" else v) for k, v in raw]


def _histogram_counts() -> dict[tuple[str, str, str], float]:
    counts: dict[tuple[str, str, str], float] = {}
    for family in REGISTRY.collect():
        if family.name == "tally_api_request_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    key = (sample.labels["route"], sample.labels["method"], sample.labels["status"])
                    counts[key] = sample.value
    return counts


async def _answers(
    store: Store, keys: dict[str, str], fast_path: bool, caplog: pytest.LogCaptureFixture
) -> tuple[list[Any], list[Any], dict[tuple[str, str, str], float]]:
    settings = ApiSettings(
        admin_key=ENV_ADMIN_KEY,
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        api_rate_per_s=1.0,
        api_rate_burst=BURST,
        api_refusal_delay_s=0.0,  # the limiter's clock is the test's: refusals at once
    )
    app = create_app(settings, store, now=lambda: NOW, rate_clock=Clock(), fast_path=fast_path)
    before = _histogram_counts()
    caplog.clear()
    transport = httpx.ASGITransport(app=app, client=("10.2.2.2", 40000))
    answers: list[Any] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        for method, path, headers in _requests(keys):
            response = await client.request(method, path, headers=headers)
            answers.append(
                (response.status_code, _without_generated_ids(response.headers, headers),
                 response.content)
            )  # fmt: skip
    logged = [
        (r.getMessage(), r.method, r.path, r.status, r.account, r.request_id)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "tally.access"
    ]
    after = _histogram_counts()
    observed = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    return answers, logged, observed


async def test_the_fast_path_answers_exactly_as_the_router(
    store: Store, keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.access")
    routed, routed_log, routed_seen = await _answers(store, keys, False, caplog)
    fast, fast_log, fast_seen = await _answers(store, keys, True, caplog)
    statuses = [status for status, _, _ in routed]
    # The cases are what they claim to be: answers, each error, and the limit.
    assert {200, 401, 403, 405, 429} <= set(statuses), statuses
    assert statuses.count(200) >= 4, statuses
    assert fast == routed
    # Generated ids differ between the runs; everything else in the line must not.
    assert [line[:5] for line in fast_log] == [line[:5] for line in routed_log]
    assert len(fast_log) == len(_requests(keys))
    assert ("caller-id-1" in {line[5] for line in fast_log}) is True
    assert fast_seen == routed_seen
    assert routed_seen[(USAGE, "GET", "200")] >= 4
