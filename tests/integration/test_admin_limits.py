"""POST /api/v1/admin/limits (docs/api.md#limits-at-the-gateway) on the real app and a
real store: per account, exactly the numbers the usage endpoints serve, and the
reflected time per partition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from producers.partitioning import partition_for
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.rollup_table import COLUMNS, MARKER_ACCOUNT, MARKER_TYPE
from schemas.store import Store
from tests.integration.test_ratelimit_headers import ACCOUNTS, NOW, PLANS, V0, V1, keys

pytestmark = pytest.mark.integration

ADMIN_KEY = "limits-test-admin-key-0123456789abcdef"
TOPIC = "tally.events"
REFLECTED = {0: NOW - timedelta(seconds=3), 1: NOW - timedelta(seconds=1)}

__all__ = ["keys"]  # the fixture, used by name


def _marker(partition: int, at: datetime) -> list[object]:
    epoch = datetime.fromtimestamp(0, UTC)
    return [MARKER_ACCOUNT, epoch, MARKER_TYPE, TOPIC, "", "", partition, "", 0, 0, 0.0, 0, 0,
            at, 100]  # fmt: skip


@pytest.fixture
def app_client(store: Store, keys: dict[str, str]) -> httpx.AsyncClient:
    store.insert("rollup_minute", [_marker(p, at) for p, at in REFLECTED.items()], COLUMNS)
    settings = ApiSettings(
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        plans=orjson.dumps(PLANS).decode(),
        admin_key=ADMIN_KEY,
        events_topic=TOPIC,
    )
    app = create_app(settings, store, now=lambda: NOW, fast_path=False)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tally")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_limits_are_the_usage_endpoints_numbers(
    app_client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    async with app_client as client:
        r = await client.post(
            "/api/v1/admin/limits",
            json={"accounts": [*ACCOUNTS, "nobody"]},
            headers=_bearer(ADMIN_KEY),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accounts"]["nobody"] is None
        assert body["partitions"] == {
            "0": "2026-02-08T14:44:44.250Z",
            "1": "2026-02-08T14:44:46.250Z",
        }
        assert body["reflected_until"] == "2026-02-08T14:44:44.250Z"
        for account, (_, requests, open_streams, _) in ACCOUNTS.items():
            got = body["accounts"][account]
            v1 = await client.get(V1, headers=_bearer(keys[account]))
            v0 = (await client.get(V0, headers=_bearer(keys[account]))).json()
            shown = v1.json()["data"]
            assert got["minute"]["requests"] == requests
            assert got["minute"]["per_minute"] == shown["requests"]["limit"]["per_minute"]
            assert got["minute"]["remaining"] == shown["requests"]["limit"]["remaining"]
            assert got["minute"]["resets_at"] == shown["requests"]["limit"]["resets_at"]
            assert got["minute"]["start"] == "2026-02-08T14:44:00.000Z"
            assert got["streams"] == {"active": open_streams, "max": shown["streams"]["max"]}
            assert got["streams"]["active"] == shown["streams"]["active"]
            for window in ("session", "weekly"):
                assert got[window]["used_percentage"] == v0[window]["used_percentage"]
                assert got[window]["resets_at"] == v0[window]["resets_at"]
            assert got["reflected_until"] == body["reflected_until"]
            assert got["partition"] is None
            assert got["partition_reflected_until"] is None


async def test_with_the_partition_count_each_account_gets_its_partitions_time(
    app_client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    """The gateway sends the events topic's partition count; each account's answer names
    the partition its events go to and that partition's time, read with its counts."""
    async with app_client as client:
        r = await client.post(
            "/api/v1/admin/limits",
            json={"accounts": [*ACCOUNTS, "nobody"], "partitions": 2},
            headers=_bearer(ADMIN_KEY),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accounts"]["nobody"] is None
        seen = set()
        for account in ACCOUNTS:
            got = body["accounts"][account]
            p = partition_for(account, 2)
            seen.add(p)
            assert got["partition"] == p
            assert got["partition_reflected_until"] == body["partitions"][str(p)]
            assert got["reflected_until"] == "2026-02-08T14:44:44.250Z"  # the least
        assert seen == {0, 1}, "the accounts should cover both partitions"
        # A partition without a marker: nothing of it counted, not the others' time.
        r = await client.post(
            "/api/v1/admin/limits",
            json={"accounts": list(ACCOUNTS), "partitions": 3},
            headers=_bearer(ADMIN_KEY),
        )
        for account, got in r.json()["accounts"].items():
            if partition_for(account, 3) == 2:
                assert got["partition_reflected_until"] is None
        bad = {"accounts": ["acme"], "partitions": 0}
        assert (await client.post("/api/v1/admin/limits", json=bad,
                                  headers=_bearer(ADMIN_KEY))).status_code == 422  # fmt: skip


async def test_limits_need_an_admin_key_and_at_most_1000_accounts(
    app_client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    async with app_client as client:
        url = "/api/v1/admin/limits"
        account_key = _bearer(keys["acme"])
        assert (
            await client.post(url, json={"accounts": []}, headers=account_key)
        ).status_code == 403
        assert (await client.post(url, json={"accounts": []})).status_code == 401
        many = {"accounts": [f"a{i}" for i in range(1001)]}
        r = await client.post(url, json=many, headers=_bearer(ADMIN_KEY))
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "validation_error"
