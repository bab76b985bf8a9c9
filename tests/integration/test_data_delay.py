"""`meta.updated_at` and `X-Data-Delay` say how far the slowest partition lags.

The usage answer is as fresh as the least fresh events partition: a lagging one
holds `updated_at` back (the view and the store agree), and an idle, caught-up
partition is kept fresh by the worker's heartbeat, with no event flowing.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.queries import reflected_until
from query_api.settings import ApiSettings
from schemas.rollup_table import offset_markers
from schemas.store import Store
from tests.rollups import ms, write_wire

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 26, 12, 0, 30, 250_000, tzinfo=UTC)


async def test_a_lagging_partition_holds_updated_at_back(store: Store) -> None:
    topic = "delay.events"
    accounts = AccountStore(store)
    accounts.create("acme", "pro")
    key, _ = accounts.create_key("acme", admin=False)
    fresh, lagging = NOW - timedelta(seconds=1), NOW - timedelta(seconds=120, milliseconds=500)
    reflected = {0: ms(fresh), 1: ms(lagging), 2: ms(fresh)}
    write_wire(store, offset_markers(topic, {0: 10, 1: 7, 2: 3}, reflected))
    for mode in ("auto", "off"):
        settings = ApiSettings(
            clickhouse_url=store.url,
            clickhouse_database=store.database,
            events_topic=topic,
            api_usage_view=mode,
        )
        app = create_app(settings, store, now=lambda: NOW)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.get("/api/v1/account/usage", headers={"X-API-Key": key})
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Data-Delay"] == "120.500", mode
        assert answer.json()["meta"]["updated_at"] == "2026-03-26T11:58:29.750Z", mode


async def test_an_idle_caught_up_partition_stays_fresh(
    pipeline_settings: WorkerSettings, pipeline_store: Store, kafka_bootstrap: str
) -> None:
    settings = pipeline_settings.model_copy(update={"worker_flush_interval_s": 0.5})
    async with running_pipeline(settings, pipeline_store):
        async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
            await gateway.record(build.request("acme", "gw-idle"))
        sent = datetime.now(UTC)
        # No more events: the heartbeat alone must carry every partition past `sent`,
        # then keep it moving.
        seen: list[datetime] = []
        deadline = time.monotonic() + 60
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            at = await asyncio.to_thread(reflected_until, pipeline_store, settings.events_topic)
            if at is not None and at > sent and (not seen or at > seen[-1]):
                seen.append(at)
            await asyncio.sleep(0.2)
    assert seen[1] > seen[0] > sent
