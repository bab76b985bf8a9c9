"""Gateway against a real broker: every event arrives once, in its account's partition."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producers import events
from producers.gateway import Gateway
from producers.loadgen import run_loadgen, traffic
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from schemas.events import CONTENT_TYPE_BATCH, CONTENT_TYPE_SINGLE, MESSAGE_ADAPTER
from tests.conftest import consume_all

pytestmark = pytest.mark.integration

PARTITIONS = 8


async def create_topic(bootstrap: str, name: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def events_of(record: Any) -> list[dict[str, Any]]:
    doc = orjson.loads(record.value)
    return doc if isinstance(doc, list) else [doc]


def check_messages(records: list[Any]) -> Counter[tuple[str, str]]:
    """Assert each message is well-formed and co-partitioned; count (source, id)."""
    seen: Counter[tuple[str, str]] = Counter()
    for record in records:
        headers = dict(record.headers)
        batch = events_of(record)
        single = isinstance(orjson.loads(record.value), dict)
        expected_type = CONTENT_TYPE_SINGLE if single else CONTENT_TYPE_BATCH
        assert headers["content-type"].decode() == expected_type
        MESSAGE_ADAPTER.validate_json(record.value)
        assert record.key == batch[0]["subject"].encode()
        for event in batch:
            assert partition_for(event["subject"], PARTITIONS) == record.partition
            seen[(event["source"], event["id"])] += 1
    return seen


async def test_20k_events_arrive_exactly_once_co_partitioned(
    kafka_bootstrap: str, unique_name: str
) -> None:
    await create_topic(kafka_bootstrap, unique_name)
    sent = list(traffic(11, 2_000, gateways=1, total=20_000, run_id=unique_name))
    async with Gateway(kafka_bootstrap, unique_name, settings=ProducerSettings()) as gateway:
        assert gateway.partitions == PARTITIONS
        for event in sent:
            await gateway.record(event)
    stats = gateway.stats
    assert (stats.events_recorded, stats.events_acked, stats.events_failed) == (20_000, 20_000, 0)

    records = await consume_all(kafka_bootstrap, unique_name, PARTITIONS)
    assert len(records) == stats.messages_sent
    assert len(records) < 20_000 / 10, "events should travel in batches"
    seen = check_messages(records)
    assert set(seen) == {(e.source, e.id) for e in sent}
    assert set(seen.values()) == {1}
    # Per partition, events come out in the order they were recorded.
    order = {(e.source, e.id): i for i, e in enumerate(sent)}
    for p in range(PARTITIONS):
        positions = [
            order[(e["source"], e["id"])] for r in records if r.partition == p for e in events_of(r)
        ]
        assert positions == sorted(positions)


async def test_send_single_lands_where_record_does(kafka_bootstrap: str, unique_name: str) -> None:
    await create_topic(kafka_bootstrap, unique_name)
    subjects = [f"acct-{k:06d}" for k in range(40)]
    async with Gateway(kafka_bootstrap, unique_name, linger_ms=1) as gateway:
        for subject in subjects:
            await gateway.send_single(events.request(subject, "gw-single"))
            await gateway.record(events.request(subject, "gw-batch"))
    records = await consume_all(kafka_bootstrap, unique_name, PARTITIONS)
    where: dict[str, set[int]] = {}
    for record in records:
        for event in events_of(record):
            where.setdefault(event["subject"], set()).add(record.partition)
    assert where == {s: {partition_for(s, PARTITIONS)} for s in subjects}
    assert sum(check_messages(records).values()) == 80


async def test_loadgen_sends_what_it_reports(kafka_bootstrap: str, unique_name: str) -> None:
    await create_topic(kafka_bootstrap, unique_name)
    result = await run_loadgen(
        kafka_bootstrap,
        unique_name,
        gateways=3,
        accounts=200,
        rate=20_000,
        duration_s=None,
        events=3_000,
        seed=5,
        progress=True,
    )
    assert result.events == 3_000
    assert result.requests > result.streams_opened > 0
    # Paced: 3,000 events at 20,000/s cannot take less than ~0.15 s.
    assert result.elapsed_s >= 0.9 * 3_000 / 20_000
    seen = check_messages(await consume_all(kafka_bootstrap, unique_name, PARTITIONS))
    assert sum(seen.values()) == len(seen) == 3_000
    assert {source for source, _ in seen} == {"gw-0", "gw-1", "gw-2"}
