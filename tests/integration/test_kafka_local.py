"""The local KRaft broker against a real JVM: data survives restarts, nothing outlives us."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka_local import LocalKafka, TopicSetupError, ensure_topics, read_properties
from deploy.processes import free_port, port_is_free, process_exited
from tests.orphans import check_dies_with_its_parent, wait_until

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBS = REPO_ROOT / ".tally" / "kafka" / "libs"
EVENTS = "tally.events"
DLQ = "tally.events.dlq"


async def _partitions(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def _produce(bootstrap: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(EVENTS, value, key=key)
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, want: int, seconds: float = 20.0) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        EVENTS,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + seconds
        while len(got) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += [(m.key, m.value) for msgs in batches.values() for m in msgs]
    finally:
        await consumer.stop()
    return got


async def test_topics_data_and_restarts(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, LIBS, port=free_port())
    try:
        # From a worker thread on purpose: the broker must not die with that thread.
        await asyncio.to_thread(broker.start)
        assert not port_is_free(broker.port)

        await ensure_topics(broker.bootstrap, {EVENTS: 8, DLQ: 1})
        await ensure_topics(broker.bootstrap, {EVENTS: 8, DLQ: 1})  # idempotent
        await ensure_topics(broker.bootstrap, {EVENTS: 2})  # more than asked is fine
        parts = await _partitions(broker.bootstrap)
        assert (parts[EVENTS], parts[DLQ]) == (8, 1)
        with pytest.raises(TopicSetupError, match="has 8 partitions, 16 are needed"):
            await ensure_topics(broker.bootstrap, {EVENTS: 16}, timeout=10)

        await _produce(broker.bootstrap, b"acct-1", b"first")
        assert await _read_all(broker.bootstrap, 1) == [(b"acct-1", b"first")]

        # A second broker on the same port explains itself instead of hanging.
        with pytest.raises(RuntimeError, match="TALLY_KAFKA_BOOTSTRAP"):
            LocalKafka(tmp_path / "other", LIBS, port=broker.port).start()

        cluster_id = read_properties(broker.log_dir / "meta.properties")["cluster.id"]
        assert "Kafka Server started" in broker.server_log.read_text()

        broker.stop()
        assert broker.pid is None
        assert port_is_free(broker.port)
        broker.stop()  # idempotent

        broker.start()
        assert read_properties(broker.log_dir / "meta.properties")["cluster.id"] == cluster_id
        assert await _read_all(broker.bootstrap, 1) == [(b"acct-1", b"first")]
        await _produce(broker.bootstrap, b"acct-2", b"second")

        java = broker.pid
        assert java is not None
        broker.kill()
        assert process_exited(java)
        assert wait_until(lambda: port_is_free(broker.port), 5)

        broker.start()  # log recovery after an unclean stop
        got = await _read_all(broker.bootstrap, 2)
        assert sorted(got) == [(b"acct-1", b"first"), (b"acct-2", b"second")]
    finally:
        broker.kill()


def test_killed_parent_takes_the_broker_down(tmp_path: Path) -> None:
    port = free_port()
    check_dies_with_its_parent(
        "deploy.kafka_local.LocalKafka",
        "Path(sys.argv[1]), Path(sys.argv[2]), port=int(sys.argv[3])",
        [str(tmp_path / "data"), str(LIBS), str(port)],
        port,
        lambda: not port_is_free(port),
        tmp_path / "child.err",
    )
