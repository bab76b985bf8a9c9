"""The webhook admin routes and the account's forecast and alerts on the real app and a
real store; the test message goes to a receiver in its own uvicorn process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from query_api.alerts.forecast import forecast
from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox
from query_api.alerts.store import AlertStore
from query_api.app import create_app
from query_api.plans import DEFAULT_PLANS
from query_api.routes.webhooks import Webhooks
from query_api.settings import ApiSettings
from query_api.usage import compute
from schemas.events import REQUEST
from schemas.store import Store
from schemas.windows import format_time
from tests.rollups import ms, write_wire
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
ADMIN = {"X-API-Key": ADMIN_KEY}
NOW = datetime(2026, 3, 30, 12, 34, 56, 789_000, tzinfo=UTC)


@dataclass
class Api:
    client: httpx.AsyncClient
    store: Store
    hooks: AlertSettings


def _settings(tmp: Path, allow_private: bool) -> AlertSettings:
    return AlertSettings(data_dir=tmp, webhook_allow_private=allow_private, webhook_timeout_s=5)


@pytest.fixture
async def api(store_url: str, unique_name: str, tmp_path: Path) -> AsyncIterator[Api]:
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store_url,
        clickhouse_database=unique_name,
        plans=None,
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    app = create_app(settings, store)
    app.state.services.now = lambda: NOW
    hooks = _settings(tmp_path, allow_private=True)
    app.state.webhooks = Webhooks(hooks, SecretBox.from_settings(hooks), AlertStore(store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        yield Api(client, store, hooks)
    store.close()


async def test_an_endpoints_life(api: Api, receiver: Receiver) -> None:
    made = await api.client.post(
        "/api/v1/admin/webhooks", json={"url": receiver.url}, headers=ADMIN
    )
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    created = made.json()["data"]
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["usage.threshold.crossed"]
    assert created["account"] is None
    stored = api.store.query("SELECT secret FROM webhook_endpoints")
    assert created["secret"] not in str(stored), "the secret is stored in the clear"

    listed = (await api.client.get("/api/v1/admin/webhooks", headers=ADMIN)).json()["data"]
    assert [e["id"] for e in listed] == [created["id"]]
    assert "secret" not in listed[0]

    receiver.start(created["secret"], fail_s=0)
    sent = await api.client.post(f"/api/v1/admin/webhooks/{created['id']}/test", headers=ADMIN)
    assert sent.status_code == 200, sent.text
    result = sent.json()["data"]
    assert result["delivered"] is True
    assert result["status_code"] == 200
    (got,) = receiver.received()
    assert got["verified"]
    assert got["id"] == result["id"]
    assert json.loads(got["body"])["type"] == "webhook.test"

    log = await api.client.get(f"/api/v1/admin/webhooks/{created['id']}/deliveries", headers=ADMIN)
    (delivery,) = log.json()["data"]
    assert delivery["id"] == result["id"]
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["log"]] == [200]

    gone = await api.client.delete(f"/api/v1/admin/webhooks/{created['id']}", headers=ADMIN)
    assert gone.json()["data"] == {"id": created["id"], "deleted": True}
    again = await api.client.delete(f"/api/v1/admin/webhooks/{created['id']}", headers=ADMIN)
    assert again.status_code == 404
    assert (await api.client.get("/api/v1/admin/webhooks", headers=ADMIN)).json()["data"] == []
    kept = await api.client.get(f"/api/v1/admin/webhooks/{created['id']}/deliveries", headers=ADMIN)
    assert len(kept.json()["data"]) == 1, "the log of a deleted endpoint stays readable"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "http://localhost/x", "http://10.0.0.1/", "ftp://example.com/"],
)
async def test_unsafe_urls_are_refused_unless_allowed(api: Api, tmp_path: Path, url: str) -> None:
    strict = _settings(tmp_path, allow_private=False)
    app = api.client._transport.app  # type: ignore[attr-defined]
    app.state.webhooks = Webhooks(strict, SecretBox.from_settings(strict), AlertStore(api.store))
    refused = await api.client.post("/api/v1/admin/webhooks", json={"url": url}, headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "validation_error"
    if not url.startswith("ftp"):
        assert "TALLY_WEBHOOK_ALLOW_PRIVATE" in refused.json()["error"]["message"]
    assert AlertStore(api.store).endpoints() == []


async def test_account_keys_may_not_manage_webhooks(api: Api) -> None:
    made = await api.client.post(
        "/api/v1/admin/accounts", json={"id": "acme", "plan": "pro"}, headers=ADMIN
    )
    key = {"X-API-Key": made.json()["data"]["api_key"]}
    response = await api.client.get("/api/v1/admin/webhooks", headers=key)
    assert response.status_code == 403
    missing = await api.client.post("/api/v1/admin/webhooks/whep_nope/test", headers=ADMIN)
    assert missing.status_code == 404


async def test_the_forecast_answers_what_the_computation_says(api: Api) -> None:
    made = await api.client.post(
        "/api/v1/admin/accounts", json={"id": "acme", "plan": "pro"}, headers=ADMIN
    )
    key = {"X-API-Key": made.json()["data"]["api_key"]}
    minute = NOW.replace(second=0, microsecond=0)
    spread = [(minute - timedelta(minutes=m), 3 * m + 1) for m in range(0, 90, 7)]
    write_wire(
        api.store,
        [
            ["acme", int(at.timestamp()), REQUEST, "", "", "", 200, "", 1, units * 1_000_000,
             0.0, 0, 0, ms(at), 0]
            for at, units in spread
        ],
    )  # fmt: skip
    answer = await api.client.get("/api/v1/account/forecast", headers=key)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    rows = sorted((at, 1, units * 1_000_000) for at, units in spread)
    usage = compute(rows, DEFAULT_PLANS["pro"], 1, NOW)
    assert usage.session.window is not None
    expected = forecast(rows, usage.session.window, 1_000, NOW)
    assert data["session"]["projected_percentage"] == expected.projected_percentage
    assert data["session"]["resets_at"] == format_time(usage.session.window.end)
    assert data["weekly"]["resets_at"] == "2026-04-06T00:00:00.000Z"
    alerts = await api.client.get("/api/v1/account/alerts", headers=key)
    assert alerts.json() == {"data": []}
