"""POST /api/v1/events when things fail: a 202 is a promise that the events are
counted, and a 503 accepts nothing.

- Kafka stops: the API answers 503 (Retry-After) while it is down; once it is back, the
  same body re-sent is accepted, and the topic holds every event of both bodies, the
  re-sent one counted once by (source, id).
- The API process is SIGKILLed right after a 202: the events are on Kafka all the same,
  and the worker counts every one of them.

These run a broker or an API process of their own, which they stop or kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.processes import free_port
from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.events import encode_event
from query_api.app import create_app
from query_api.ingest import BATCH
from query_api.routes.admin import account_totals
from query_api.settings import ApiSettings
from schemas.rollup_table import RollupStore
from schemas.store import Store
from tests.conftest import consume_all, own_broker

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TALLY = REPO_ROOT / ".venv" / "bin" / "tally"
ADMIN_KEY = "admin-key-for-ingest-outage-0123456789"
PARTITIONS = 4
PATH = "/api/v1/events"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker these tests may stop and restart (on the same data dir)."""
    with own_broker(tmp_path_factory, "ingest-kafka") as kafka:
        yield kafka


def _events(n: int, source: str) -> list[Any]:
    now = datetime.now(UTC)
    return [
        build.request(f"acct-{i % 13}", source, units=1.5, time=now - timedelta(seconds=i))
        for i in range(n)
    ]


def _body(events: list[Any]) -> bytes:
    return b"[" + b",".join(encode_event(e) for e in events) + b"]"


async def _copies(
    bootstrap: str, topic: str, partitions: int = PARTITIONS
) -> Counter[tuple[str, str]]:
    """(source, id) -> copies on the topic."""
    seen: Counter[tuple[str, str]] = Counter()
    for record in await consume_all(bootstrap, topic, partitions):
        doc = orjson.loads(record.value)
        for event in doc if isinstance(doc, list) else [doc]:
            seen[(event["source"], event["id"])] += 1
    return seen


@pytest.fixture
async def ingest_client(
    broker: LocalKafka, store: Store, unique_name: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    topic = f"{unique_name}.events"
    await ensure_topics(broker.bootstrap, {topic: PARTITIONS})
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        kafka_bootstrap=broker.bootstrap,
        events_topic=topic,
        ingest_timeout_s=3.0,
    )
    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            yield client, topic
    finally:
        await app.state.services.ingest.publisher.close()


async def test_kafka_down_is_503_and_the_retry_counts_once(
    broker: LocalKafka, ingest_client: tuple[httpx.AsyncClient, str]
) -> None:
    client, topic = ingest_client
    headers = {"X-API-Key": ADMIN_KEY, "Content-Type": BATCH}
    first, second = _events(60, "gw-before"), _events(60, "gw-during")
    answer = await client.post(PATH, content=_body(first), headers=headers)
    assert answer.status_code == 202, answer.text

    broker.stop()
    try:
        refused = await client.post(PATH, content=_body(second), headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert "none was accepted" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0
    finally:
        broker.start()

    # The client retries the very body until it is accepted, as Retry-After asks.
    deadline = time.monotonic() + 90
    while True:
        retried = await client.post(PATH, content=_body(second), headers=headers)
        if retried.status_code == 202:
            break
        assert retried.status_code == 503, retried.text
        assert time.monotonic() < deadline, "Kafka is back, yet the body is still refused"
        await asyncio.sleep(1)
    assert retried.json()["data"] == {"accepted": 60, "rejected": []}

    copies = await _copies(broker.bootstrap, topic)
    want = {(e.source, e.id) for e in [*first, *second]}
    # Every event is there; some of the refused body may be there twice (sent before
    # the 503 and again on the retry): (source, id) makes them count once.
    assert set(copies) == want
    assert all(copies[(e.source, e.id)] == 1 for e in first)


@pytest.fixture
def api_process(
    pipeline_settings: WorkerSettings, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_BOOTSTRAP=pipeline_settings.bootstrap,
        TALLY_EVENTS_TOPIC=pipeline_settings.events_topic,
        TALLY_API_PORT=str(port),
        TALLY_ADMIN_KEY=ADMIN_KEY,
    )
    with (tmp_path / "api.log").open("ab") as out:
        proc = subprocess.Popen(
            [str(TALLY), "api"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_a_202_survives_a_sigkill_of_the_api_right_after_it(
    api_process: tuple[subprocess.Popen[bytes], str],
    pipeline_settings: WorkerSettings,
    pipeline_store: Store,
) -> None:
    proc, url = api_process
    events = _events(300, "gw-killed")
    headers = {"X-API-Key": ADMIN_KEY, "Content-Type": BATCH}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answer = await client.post(PATH, content=_body(events), headers=headers)
        os.kill(proc.pid, signal.SIGKILL)  # right after the 202: nothing else happens first
    assert answer.status_code == 202, answer.text
    assert answer.json()["data"]["accepted"] == 300
    proc.wait(10)

    copies = await _copies(pipeline_settings.bootstrap, pipeline_settings.events_topic, 8)
    assert copies == Counter({(e.source, e.id): 1 for e in events})
    # And the worker counts them: every account's requests and units, exactly.
    async with running_pipeline(pipeline_settings, pipeline_store):
        ends = await _ends(pipeline_settings)
        sink = RollupStore(pipeline_store)
        deadline = time.monotonic() + 120
        while True:
            done = await asyncio.to_thread(sink.resume_offsets, pipeline_settings.events_topic)
            if all(done.get(p, 0) >= end for p, end in ends.items()):
                break
            assert time.monotonic() < deadline, f"not consumed: {done} < {ends}"
            await asyncio.sleep(0.5)
    now = datetime.now(UTC)
    totals = account_totals(
        pipeline_store,
        pipeline_settings.events_topic,
        now - timedelta(hours=1),
        now + timedelta(minutes=2),
        None,
    )
    want: Counter[str] = Counter(e.subject for e in events)
    assert {t.account: t.requests for t in totals.data} == dict(want)
    assert {t.account: t.units for t in totals.data} == {a: n * 1.5 for a, n in want.items()}


async def _ends(settings: WorkerSettings) -> dict[int, int]:
    """The end offset of each of the events topic's 8 partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.events_topic, p) for p in range(8)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()
