"""Gateways -> real Kafka -> faust worker -> ClickHouse rollups, checked to the unit.

120k+ events go through the producer library (batched and single), with re-sent
duplicates and malformed input mixed in. The expected rollups are computed here,
independently of processors/, from the events the test generated; the store must
hold exactly them, and every bad message must sit in the DLQ with its reason.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy.stack import running_pipeline
from processors.app import RollupWorker
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from schemas.store import Store
from tests.traffic import Shape, mixed_traffic

pytestmark = pytest.mark.integration

N_UNIQUE = 120_000
N_ACCOUNTS = 2_000


def _micro(units: float) -> int:
    return int(Decimal(repr(units)) * 1_000_000)


TRAFFIC = Shape(
    events=N_UNIQUE,
    accounts=N_ACCOUNTS,
    account_digits=5,
    sources=4,
    span_s=2 * 86_400,
    opens=0.04,
    closes=0.07,
    opened={"route": "/v1/chat", "model": "m-large"},
    closed_units=lambda rng: {"units": round(rng.uniform(0, 40), 3)},
    request=lambda rng: {
        "units": rng.choice([1.0, 1.0, 2.0, 0.5, round(rng.uniform(0, 10), 3)]),
        "route": rng.choice(["/v1/messages", "/v1/embeddings", None]),
        "method": rng.choice(["GET", "POST"]),
        "status": rng.choice([200, 200, 200, 429, 500]),
        "model": rng.choice(["m-small", "m-large", None]),
        "latency_ms": rng.uniform(1, 900),
        "bytes_in": rng.randrange(10_000),
        "bytes_out": rng.randrange(50_000),
    },
)


def _expected(events: list[Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """(account, type) -> (events, units in millionths), from the events alone."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for event in events:
        cell = totals[(event.subject, event.type)]
        cell[0] += 1
        cell[1] += _micro(getattr(event.data, "units", 0.0))
    return {key: (n, units) for key, (n, units) in totals.items()}


def _junk(now: datetime) -> list[tuple[bytes, str]]:
    """Malformed or invalid messages, each with the reason the DLQ must give."""
    good = orjson.loads(build.encode_event(build.request("acct-junk", "gw-x", time=now)))

    def variant(**changes: Any) -> bytes:
        doc = {**good, **changes}
        return orjson.dumps({k: v for k, v in doc.items() if v is not None})

    return [
        (b"{not json", "malformed_json"),
        (b"42", "not_an_event"),
        (b"[]", "empty_batch"),
        (variant(id=None), "missing_attribute"),
        (variant(type="tally.unknown.v1"), "unknown_type"),
        (variant(specversion="0.3"), "unsupported_specversion"),
        (variant(data={"units": -1}), "invalid_attribute"),
        (variant(subject="has space"), "invalid_attribute"),
        (variant(time="2026-01-01T00:00:00"), "invalid_attribute"),
        (variant(time=(now + timedelta(hours=1)).isoformat()), "time_in_future"),
        (variant(time=(now - timedelta(days=40)).isoformat()), "too_late"),
        (b"[" + b"x" * 1_000_100 + b"]", "oversized"),
    ]


@pytest.fixture
async def worker(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> AsyncIterator[tuple[WorkerSettings, Store, RollupWorker]]:
    async with running_pipeline(pipeline_settings, pipeline_store) as (rollup_worker, _):
        yield pipeline_settings, pipeline_store, rollup_worker


async def _drain_dlq(bootstrap: str, topic: str, expect: int) -> list[Any]:
    # Dead letters are written in the workers' transactions: read committed ones only.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while len(got) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                got.extend(records)
        await asyncio.sleep(1)  # and nothing more than expected arrives
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            got.extend(records)
    finally:
        await consumer.stop()
    return got


async def test_rollups_equal_ground_truth(
    worker: tuple[WorkerSettings, Store, RollupWorker], kafka_bootstrap: str
) -> None:
    settings, store, rollup_worker = worker
    rng = random.Random(20261121)
    now = datetime.now(UTC)
    unique = mixed_traffic(rng, now, TRAFFIC)
    resent = rng.sample(unique, 6_000)
    junk = _junk(now)

    async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
        for i, event in enumerate(unique):
            if i % 10 == 0:
                await gateway.send_single(event)  # a gateway without the library
            else:
                await gateway.record(event)
        for event in resent:  # retries of events already sent
            await gateway.record(event)
    # A batch holding valid events around invalid ones: only the bad ones go.
    extra_good = [build.request("acct-mixed", "gw-m", units=3.0, time=now) for _ in range(3)]
    mixed = (
        b"["
        + b",".join(
            [
                build.encode_event(extra_good[0]),
                b'{"specversion":"1.0"}',
                build.encode_event(extra_good[1]),
                b"17",
                build.encode_event(extra_good[2]),
            ]
        )
        + b"]"
    )
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=2_000_000)
    await raw.start()
    try:
        for value, _ in junk:
            await raw.send_and_wait(settings.events_topic, value, key=b"acct-junk")
        await raw.send_and_wait(settings.events_topic, mixed, key=b"acct-mixed")
    finally:
        await raw.stop()

    expected = _expected(unique + extra_good)
    want_events = sum(n for n, _ in expected.values())

    deadline = time.monotonic() + 180
    got: dict[tuple[str, str], tuple[int, int]] = {}
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(
            store.query,
            "SELECT account, type, sum(events), sum(units_micro) FROM rollup_minute "
            "WHERE account != '' GROUP BY account, type",
        )
        got = {(a, t): (int(n), int(u)) for a, t, n, u in rows}
        if sum(n for n, _ in got.values()) >= want_events:
            break
        await asyncio.sleep(1)
    await asyncio.sleep(2)  # anything counted twice would show up by now
    rows = await asyncio.to_thread(
        store.query,
        "SELECT account, type, sum(events), sum(units_micro) FROM rollup_minute "
        "WHERE account != '' GROUP BY account, type",
    )
    got = {(a, t): (int(n), int(u)) for a, t, n, u in rows}

    assert got == expected
    stats = rollup_worker.stats
    print(
        f"\ncounted {stats.counted} events, dropped {stats.duplicates} duplicates, "
        f"{stats.dead_letters} dead letters, {stats.flushes} flushes"
    )
    assert stats.duplicates == len(resent)

    # Per-minute placement, for a sample account: buckets equal the event times.
    account = unique[0].subject
    per_minute = Counter(
        (e.time.replace(second=0, microsecond=0), e.type) for e in unique if e.subject == account
    )
    rows = await asyncio.to_thread(
        store.query,
        "SELECT minute, type, sum(events) FROM rollup_minute WHERE account = {a:String} "
        "GROUP BY minute, type",
        {"a": account},
    )
    assert {(m, t): int(n) for m, t, n in rows} == dict(per_minute)

    letters = await _drain_dlq(kafka_bootstrap, settings.dlq_topic, len(junk) + 2)
    reasons = Counter(dict(r.headers)["tally-reason"].decode() for r in letters)
    assert reasons == Counter(
        [reason for _, reason in junk] + ["missing_attribute", "not_an_event"]
    )
    by_reason = {dict(r.headers)["tally-reason"].decode(): r for r in letters}
    assert by_reason["malformed_json"].value == b"{not json"
    assert dict(by_reason["malformed_json"].headers)["tally-source-topic"] == (
        settings.events_topic.encode()
    )
