"""Fixtures shared by every test tier.

`kafka_bootstrap` finds a broker for the whole session, in this order:
1. TALLY_TEST_KAFKA_BOOTSTRAP (a broker someone already runs, e.g. in CI);
2. a Kafka container, when a Docker engine answers;
3. a local KRaft broker from the Maven jars in .tally/kafka/libs (`make setup`).
No Kafka at all fails the tests that need one: skipping would hide untested code.

`clickhouse_server_url` finds a ClickHouse *server* the same way: TALLY_TEST_CLICKHOUSE_URL
when it names one (http(s)://), a ClickHouse container, else ClickHouse's own server code
from the chdb wheel (deploy/clickhouse_local.py). `store_url` stays the embedded engine
unless TALLY_TEST_CLICKHOUSE_URL says otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.clickhouse_local import LocalClickHouse
from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.processes import free_port
from processors.settings import WorkerSettings
from query_api.settings import ApiSettings
from schemas.store import Store
from tests.webhook_receiver import Receiver

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_LIBS = REPO_ROOT / ".tally" / "kafka" / "libs"

MakeTopics = Callable[[str, Mapping[str, int]], Awaitable[None]]


def _docker_engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("TALLY_TEST_KAFKA_BOOTSTRAP", "").strip()
    if given:
        yield given
        return

    docker_problem = _docker_engine()
    if docker_problem is None:
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.13 kept it at the top level
            from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return

    # A free port, never 9092: a developer's `tally up` may be holding that one.
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), KAFKA_LIBS, port=free_port())
    try:
        broker.start()
    except Exception as exc:
        broker.kill()
        pytest.fail(
            "No Kafka broker for the tests. TALLY_TEST_KAFKA_BOOTSTRAP is not set; no Docker "
            f"engine ({docker_problem}); and the local broker failed: {exc}",
            pytrace=False,
        )
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique_name() -> str:
    """A fresh name for a topic, consumer group or database: tests share one broker."""
    return f"t{uuid.uuid4().hex[:10]}"


async def make_topics(bootstrap: str, topics: Mapping[str, int]) -> None:
    """Create `{name: partitions}` and wait until every partition has a leader."""
    await ensure_topics(bootstrap, topics)


@pytest.fixture(name="make_topics")
def make_topics_fixture() -> MakeTopics:
    """`await make_topics(kafka_bootstrap, {name: partitions})` without importing conftest."""
    return make_topics


@pytest.fixture(scope="session")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ClickHouse target for the whole session.

    chdb admits one data path per process, so every test shares one path and
    isolates itself with a database of its own (`unique_name`).
    """
    explicit = os.environ.get("TALLY_TEST_CLICKHOUSE_URL")
    if explicit:
        return explicit
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="session")
def clickhouse_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An http(s):// URL of a ClickHouse server for the whole session.

    Tests share it and isolate themselves with databases of their own (`unique_name`).
    """
    given = os.environ.get("TALLY_TEST_CLICKHOUSE_URL", "").strip()
    if given.startswith(("http://", "https://")):
        yield given
        return

    docker_problem = _docker_engine()
    if docker_problem is None:
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer() as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(8123)
            yield f"http://{container.username}:{container.password}@{host}:{port}"
        return

    server = LocalClickHouse(tmp_path_factory.mktemp("clickhouse"), port=free_port())
    try:
        server.start()
    except Exception as exc:
        server.kill()
        pytest.fail(
            "No ClickHouse server for the tests. TALLY_TEST_CLICKHOUSE_URL names none; no "
            f"Docker engine ({docker_problem}); and the local server failed: {exc}",
            pytrace=False,
        )
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def store(store_url: str, unique_name: str) -> Iterator[Store]:
    """A migrated store in a database of the test's own, closed afterwards."""
    s = Store(store_url, unique_name)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def pipeline_settings(
    kafka_bootstrap: str, store_url: str, unique_name: str
) -> WorkerSettings:
    """Worker settings with topics (8 partitions), a group and a database of the test's own."""
    settings = worker_settings(kafka_bootstrap, store_url, unique_name)
    await ensure_topics(kafka_bootstrap, {settings.events_topic: 8, settings.dlq_topic: 1})
    return settings


def worker_settings(
    kafka_bootstrap: str, store_url: str, name: str, **update: Any
) -> WorkerSettings:
    """Worker settings whose topics, consumer group and database are named after `name`
    (a test's unique name), so tests sharing a broker and a store never meet."""
    return WorkerSettings(
        kafka_bootstrap=kafka_bootstrap,
        events_topic=f"{name}.events",
        dlq_topic=f"{name}.dlq",
        rollups_topic=f"{name}.rollups",
        consumer_group=f"{name}-worker",
        clickhouse_url=store_url,
        clickhouse_database=name,
        **update,
    )


@pytest.fixture
def pipeline_store(pipeline_settings: WorkerSettings) -> Store:
    store = Store(pipeline_settings.store_url, pipeline_settings.store_database)
    store.migrate()
    return store


async def consume_all(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record of the topic, read from the beginning up to the current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1_000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


@contextmanager
def own_broker(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[LocalKafka]:
    """A broker of a test module's own (a free port, a fresh data dir named `name`), for
    tests that stop, kill and restart it; the session's shared broker is left alone.
    Killed if it fails to start; stopped, then killed, when the block ends."""
    kafka = LocalKafka(tmp_path_factory.mktemp(name), KAFKA_LIBS, port=free_port())
    try:
        kafka.start()
    except Exception:
        kafka.kill()
        raise
    try:
        yield kafka
    finally:
        kafka.stop()
        kafka.kill()


def api_settings_for(worker: WorkerSettings, **extra: Any) -> ApiSettings:
    """An API on the worker's broker, topics, group and store (`extra` on top)."""
    return ApiSettings(
        kafka_bootstrap=worker.kafka_bootstrap,
        events_topic=worker.events_topic,
        rollups_topic=worker.rollups_topic,
        consumer_group=worker.consumer_group,
        clickhouse_url=worker.clickhouse_url,
        clickhouse_database=worker.clickhouse_database,
        **extra,
    )


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A webhook receiver process of the test's own (tests/webhook_receiver.py)."""
    found = Receiver(tmp_path)
    try:
        yield found
    finally:
        found.stop()
