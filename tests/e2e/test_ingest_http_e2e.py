"""Both usage endpoints, end to end, with every event sent over HTTP (POST /api/v1/events).

The traffic and the expectation are those of tests/e2e/test_usage_e2e.py (answers
computed here from the raw events, by the documented rules); only the way in
differs: single events and batches of mixed subjects through the API's own producer,
re-sent duplicates over HTTP, and junk elements inside batches that must be refused by
index with their dead-letter reason while their neighbours are accepted. Every answer's
counts are checked exactly, and so is every account's usage afterwards.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers.events import encode_event
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.ingest import BATCH, JSON, SINGLE
from schemas.store import Store
from tests.e2e.test_usage_e2e import (
    _expected,
    _traffic,
    _wait_until_consumed,
    oracle_accounts,
    oracle_api_settings,
    read_as_expected,
    register,
)

pytestmark = pytest.mark.e2e

PATH = "/api/v1/events"
# (element, the reason it is refused with)
JUNK: list[tuple[bytes, str | None]] = [
    (b"1", "not_an_event"),
    (b'{"specversion": "1.0", "subject": "e2e-000"}', "missing_attribute"),
    (
        b'{"specversion": "1.0", "id": "j1", "source": "gw", "type": "tally.request.v1", '
        b'"subject": "not an id", "time": "2026-01-01T00:00:00Z"}',
        "invalid_attribute",
    ),
    (
        b'{"specversion": "1.0", "id": "j2", "source": "gw", "type": "tally.nope.v1", '
        b'"subject": "e2e-000", "time": "2026-01-01T00:00:00Z"}',
        "unknown_type",
    ),
]


@pytest.fixture
async def stack(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> AsyncIterator[tuple[WorkerSettings, Store]]:
    async with running_pipeline(pipeline_settings, pipeline_store):
        yield pipeline_settings, pipeline_store


async def _send(
    client: httpx.AsyncClient, key: str, body: bytes, kind: str, accepted: int, rejected: Any
) -> None:
    answer = await client.post(PATH, content=body, headers={"X-API-Key": key, "Content-Type": kind})
    assert answer.status_code == 202, answer.text
    data = answer.json()["data"]
    assert data["accepted"] == accepted, data
    assert [(r["index"], r["code"]) for r in data["rejected"]] == rejected


async def _send_all(
    client: httpx.AsyncClient, key: str, events: list[Any], rng: random.Random, now: datetime
) -> None:
    """Singles, then batches of 1 to 100 of mixed subjects (junk slipped into some),
    then a twentieth of the events again. An event more than 5 minutes ahead of `now`
    (the traffic has a few) is refused as the worker would refuse it: time_in_future."""
    ahead = now + timedelta(minutes=5)
    elements = [(encode_event(e), "time_in_future" if e.time > ahead else None) for e in events]
    singles, rest = elements[:40], elements[40:]
    for raw, reason in singles:
        refused = [] if reason is None else [(0, reason)]
        await _send(client, key, raw, rng.choice([SINGLE, JSON]), 1 - len(refused), refused)
    i = 0
    while i < len(rest):
        size = rng.choice([1, 7, 50, 100, 100])
        chunk = list(rest[i : i + size])
        i += size
        if rng.random() < 0.3:
            for junk in rng.sample(JUNK, 2):
                chunk.insert(rng.randrange(len(chunk) + 1), junk)
        await _post_batch(client, key, chunk, rng.choice([BATCH, JSON]))
    again = rng.sample(elements, len(elements) // 20)
    for start in range(0, len(again), 100):
        await _post_batch(client, key, again[start : start + 100], BATCH)


async def _post_batch(
    client: httpx.AsyncClient, key: str, elements: list[tuple[bytes, str | None]], kind: str
) -> None:
    refused = [(i, reason) for i, (_, reason) in enumerate(elements) if reason is not None]
    body = b"[" + b",".join(raw for raw, _ in elements) + b"]"
    await _send(client, key, body, kind, len(elements) - len(refused), refused)


async def test_usage_is_exact_with_every_event_sent_over_http(
    stack: tuple[WorkerSettings, Store],
) -> None:
    settings, store = stack
    rng = random.Random(17_2026)
    now = datetime.now(UTC)
    accounts = oracle_accounts(rng, 24)
    events = _traffic(rng, accounts, now)
    shuffled = list(events)
    rng.shuffle(shuffled)  # batches of many subjects: the server places each event

    ingest_key, _ = AccountStore(store).create_key(None, admin=False)
    keys = register(store, accounts)
    api_settings = oracle_api_settings(settings, kafka_bootstrap=settings.kafka_bootstrap)
    ingest = create_app(api_settings, store, now=lambda: now)
    by_account: dict[str, list[Any]] = {a.id: [] for a in accounts}
    for event in events:
        if event.time <= now + timedelta(minutes=5):  # the others are refused
            by_account[event.subject].append(event)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ingest), base_url="http://tally"
    ) as client:
        try:
            await _send_all(client, ingest_key, shuffled, rng, now)
        finally:
            await ingest.state.services.ingest.publisher.close()
    await _wait_until_consumed(settings, store)

    # Read by an API started now: its usage view loads what the worker counted (the
    # one above never saw the sink's writes, which run in another component here).
    reader = create_app(api_settings, store, now=lambda: now)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=reader), base_url="http://tally"
    ) as client:
        for account in accounts:
            want = _expected(account, by_account[account.id], now)
            await read_as_expected(client, keys[account.id], want, now, account)

    answers = [_expected(a, by_account[a.id], now) for a in accounts]
    assert any(x["summary"]["session"]["used_percentage"] > 100 for x in answers)
    assert any(x["v1"]["streams"]["active"] > 0 for x in answers)
    assert now - timedelta(days=8) > min(e.time for e in events)
    assert any(e.time > now + timedelta(minutes=5) for e in events)  # some were refused
