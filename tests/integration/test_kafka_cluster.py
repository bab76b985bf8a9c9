"""Three local brokers form one KRaft cluster that loses nothing when one of them dies.

deploy/kafka_cluster.py: replication factor 3 and min.insync.replicas 2 for every
topic. Acknowledged writes (acks=all, idempotent) before and after a SIGKILL of the
broker leading the partition are all read back; the broker rejoins after a restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka_cluster import LocalKafkaCluster
from deploy.kafka_local import ensure_topics
from deploy.processes import free_port, port_is_free
from tests.conftest import KAFKA_LIBS

pytestmark = pytest.mark.integration


def _three_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        if all(port_is_free(base + i) for i in range(3)):
            return base
    raise RuntimeError("no three consecutive free ports")


async def _produce(bootstrap: str, topic: str, values: range) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=30_000
    )
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, str(value).encode(), partition=0)
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, expect: int) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    got: list[int] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(60):
            while len(got) < expect:
                for records in (await consumer.getmany(timeout_ms=1_000)).values():
                    got.extend(int(r.value) for r in records)
    finally:
        await consumer.stop()
    return got


async def _leader(bootstrap: str, topic: str) -> tuple[int, list[int], list[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    (partition,) = [p for p in meta["partitions"] if p["partition"] == 0]
    return int(partition["leader"]), list(partition["replicas"]), list(partition["isr"])


async def test_a_three_broker_cluster_survives_the_loss_of_the_leader(tmp_path: Path) -> None:
    cluster = LocalKafkaCluster(tmp_path, KAFKA_LIBS, brokers=3, port=_three_free_ports(),
                                heap="256m")  # fmt: skip
    await asyncio.to_thread(cluster.start)
    try:
        bootstrap = cluster.bootstrap
        await ensure_topics(bootstrap, {"t.cluster": 2})
        leader, replicas, _ = await _leader(bootstrap, "t.cluster")
        assert sorted(replicas) == [1, 2, 3]
        await _produce(bootstrap, "t.cluster", range(100))

        cluster.nodes[leader - 1].kill()
        await _produce(bootstrap, "t.cluster", range(100, 200))
        assert sorted(await _read_all(bootstrap, "t.cluster", 200)) == list(range(200))
        new_leader, _, isr = await _leader(bootstrap, "t.cluster")
        assert new_leader != leader
        assert leader not in isr

        await asyncio.to_thread(cluster.nodes[leader - 1].start)
        await asyncio.to_thread(cluster.nodes[leader - 1].wait_ready, 60.0, 3)
    finally:
        await asyncio.to_thread(cluster.stop)
    # A restart finds the same cluster: same id, same data.
    await asyncio.to_thread(cluster.start)
    try:
        assert sorted(await _read_all(cluster.bootstrap, "t.cluster", 200)) == list(range(200))
    finally:
        await asyncio.to_thread(cluster.stop)
