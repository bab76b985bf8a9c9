"""A worker whose transactional producer is fenced while it still owns the partition.

Kafka fences a transactional producer when another one initialises the same
transactional id (a new owner after a rebalance) but also when the transaction
coordinator aborts a transaction that ran past its timeout (a stalled broker or
worker): then no rebalance follows, and the partition stays this worker's. Its
consumer has read past the batch whose commit failed, so unless the worker goes
back to the committed offset, that batch is never counted.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from producers.partitioning import partition_for
from schemas.store import Store

pytestmark = pytest.mark.integration

ACCOUNT = "fenced-acct"


async def _counted(store: Store, want: int, within_s: float = 60.0) -> int:
    """Events counted for ACCOUNT once `want` are (or what is there at the deadline)."""
    deadline = time.monotonic() + within_s
    got = 0
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(
            store.query,
            "SELECT sum(events) FROM rollup_minute WHERE account = {a:String}",
            {"a": ACCOUNT},
        )
        got = int(rows[0][0] or 0)
        if got >= want:
            return got
        await asyncio.sleep(0.2)
    return got


async def _send(bootstrap: str, topic: str, first: int, n: int) -> None:
    async with Gateway(bootstrap, topic) as gateway:
        for i in range(first, first + n):
            await gateway.record(build.request(ACCOUNT, "gw-fence", id=f"e{i}"))


async def test_a_batch_whose_commit_was_fenced_is_counted_all_the_same(
    pipeline_settings: WorkerSettings, pipeline_store: Store, kafka_bootstrap: str
) -> None:
    settings = pipeline_settings.model_copy(update={"worker_flush_interval_s": 0.2})
    partition = partition_for(ACCOUNT, 8)
    transactional_id = f"{settings.consumer_group}.{settings.events_topic}.{partition}"
    async with running_pipeline(settings, pipeline_store) as (worker, _):
        await _send(kafka_bootstrap, settings.events_topic, 0, 10)
        assert await _counted(pipeline_store, 10) == 10
        # What a coordinator's transaction timeout does too: the worker's producer
        # for the partition is fenced while the group leaves the partition with it.
        fencer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, transactional_id=transactional_id
        )
        await fencer.start()
        await fencer.stop()
        await _send(kafka_bootstrap, settings.events_topic, 10, 10)
        deadline = time.monotonic() + 30
        while worker.stats.fenced == 0:
            assert time.monotonic() < deadline, "the worker's commit was never fenced"
            await asyncio.sleep(0.1)
        await _send(kafka_bootstrap, settings.events_topic, 20, 10)
        assert await _counted(pipeline_store, 30) == 30
        # And not more: nothing was counted twice.
        await asyncio.sleep(1.0)
        assert await _counted(pipeline_store, 31, within_s=0.5) == 30
