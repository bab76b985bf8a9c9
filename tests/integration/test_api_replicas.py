"""API replicas on a ClickHouse server answer usage from their own views, exactly
(query_api/view.py, query_api/view_feed.py), with a real Kafka and a real server.

Events go through the real pipeline (worker and sink) into the server; two API apps,
each with its own view, snapshot and `tally.rollups` consumer, answer. One starts
before any event (its snapshot is empty), one after the first half (its snapshot
holds it, and its feed must not count that half again). Both must give every
account's exact totals, equal to what the store itself answers; and a key created
through one replica must work on the other, a revoked one be refused by it, within
1 s (measured and printed).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.deps import Services
from query_api.settings import ApiSettings
from schemas.store import Store
from tests.conftest import api_settings_for

pytestmark = pytest.mark.integration

ACCOUNTS = [f"acct-{i}" for i in range(12)]
PROPAGATION_LIMIT_S = 1.0
V1 = "/api/v1/account/usage"


@pytest.fixture
async def server_settings(
    pipeline_settings: WorkerSettings, clickhouse_server_url: str, unique_name: str
) -> WorkerSettings:
    return pipeline_settings.model_copy(
        update={"clickhouse_url": clickhouse_server_url, "clickhouse_database": unique_name}
    )


@asynccontextmanager
async def _replica(settings: ApiSettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One API app with its own store connection, view and feed, as `tally api` runs it."""
    store = Store(settings.store_url, settings.store_database)
    app = create_app(settings, store)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
                yield app, client
    finally:
        store.close()


async def _today(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    answer = await client.get(V1, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


async def _send(gateway: Gateway, rng: random.Random, count: int, sent: Counter[str]) -> None:
    """`count` events, about a fifth of them sent twice (the worker counts them once)."""
    for _ in range(count):
        account = rng.choice(ACCOUNTS)
        event = build.request(account, "gw-replicas", units=1.0)
        await gateway.record(event)
        if rng.random() < 0.2:
            await gateway.record(event)
        sent[account] += 1
    await gateway.flush()


async def _until(what: str, check: Callable[[], Any], limit_s: float = 60.0) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < limit_s, f"{what}: not within {limit_s:.0f}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_two_replicas_on_the_server_are_exact_and_share_keys(
    server_settings: WorkerSettings, kafka_bootstrap: str
) -> None:
    store = Store(server_settings.store_url, server_settings.store_database)
    store.migrate()
    accounts = AccountStore(store)
    keys = {}
    for account in ACCOUNTS:
        accounts.create(account, "max")
        keys[account], _ = accounts.create_key(account, admin=False)
    rng = random.Random(2026_12_07)
    sent: Counter[str] = Counter()
    api = api_settings_for(server_settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_pipeline(server_settings, store))
        _, early = await stack.enter_async_context(_replica(api))
        gateway = await stack.enter_async_context(
            Gateway(kafka_bootstrap, server_settings.events_topic)
        )
        await _send(gateway, rng, 1_500, sent)

        async def store_has_first_half() -> bool:
            rows = store.query("SELECT sum(events) FROM rollup_minute WHERE type != 'kafka.offset'")
            return bool(rows) and int(rows[0][0]) == sum(sent.values())

        await _until("the sink stored the first half", store_has_first_half)
        late_app, late = await stack.enter_async_context(_replica(api))
        late_services: Services = late_app.state.services
        assert late_services.view is not None
        assert late_services.view.rows > 0
        await _send(gateway, rng, 1_500, sent)
        off = api_settings_for(server_settings, api_usage_view="off")
        reader_app, store_reader = await stack.enter_async_context(_replica(off))

        async def replicas_exact() -> bool:
            # The store reader too: a replica's view may run ahead of the sink's
            # INSERTs (it reads the committed deltas themselves), never differ.
            for account in ACCOUNTS:
                for client in (early, late, store_reader):
                    data = await _today(client, keys[account])
                    if data["requests"]["today"] != sent[account]:
                        return False
            return True

        settle = await _until("both replicas and the store exact", replicas_exact)
        print(f"both replicas and the store exact {settle:.2f}s after the last event was flushed")
        # A replica whose bound holds only some accounts reads the others from the store.
        bounded = api_settings_for(server_settings, api_view_max_rows=len(ACCOUNTS) // 2)
        bounded_app, small = await stack.enter_async_context(_replica(bounded))
        for account in ACCOUNTS:
            from_store = await _today(store_reader, keys[account])
            assert await _today(early, keys[account]) == from_store
            assert await _today(late, keys[account]) == from_store
            assert await _today(small, keys[account]) == from_store
        assert reader_app.state.services.view is None
        assert bounded_app.state.services.view.evicted

        # A key made through one replica works on the other; revoked, it is refused.
        # Timed from the write's return: the store has the row; how long until the other
        # replica acts on it.
        key, info = await asyncio.to_thread(late_services.accounts.create_key, "acct-0", False)
        made_at = time.monotonic()

        async def works() -> bool:
            answer = await early.get(V1, headers={"X-API-Key": key})
            return answer.status_code == 200

        await _until("the new key works on the other replica", works, 5)
        created_s = time.monotonic() - made_at
        assert await asyncio.to_thread(late_services.accounts.revoke_key, info.prefix)
        revoked_at = time.monotonic()

        async def refused() -> bool:
            answer = await early.get(V1, headers={"X-API-Key": key})
            return answer.status_code == 401

        await _until("the revoked key is refused on the other replica", refused, 5)
        revoked_s = time.monotonic() - revoked_at
        print(f"key propagation: created {created_s:.3f}s, revoked {revoked_s:.3f}s")
        assert created_s <= PROPAGATION_LIMIT_S
        assert revoked_s <= PROPAGATION_LIMIT_S
        # Freshness is each replica's own: both reflect events of the last minutes.
        for client in (early, late):
            answer = await client.get(V1, headers={"X-API-Key": keys["acct-1"]})
            updated = datetime.fromisoformat(answer.json()["meta"]["updated_at"])
            assert (datetime.now(UTC) - updated).total_seconds() < 60
    store.close()
