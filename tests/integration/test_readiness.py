"""/readyz against real components: an idle pipeline is ready, and each broken link
is named by its code (query_api/readiness.py).

No event is sent in any of these tests: readiness must not wait for traffic. Each
test polls /readyz (refreshed every 0.2 s here) until the expected answer, bounded
in time, and prints how long it took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.kafka_local import LocalKafka
from deploy.processes import free_port
from deploy.stack import ensure_rollups_topic, running_pipeline
from processors.app import build_app
from processors.settings import WorkerSettings
from processors.sink import Sink
from query_api import queries
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.rollup_table import RollupStore
from schemas.store import Store
from tests.conftest import api_settings_for

pytestmark = pytest.mark.integration

KAFKA_LIBS = Path(__file__).resolve().parents[2] / ".tally" / "kafka" / "libs"


def api_settings(worker: WorkerSettings, **extra: Any) -> ApiSettings:
    return api_settings_for(worker, **{"readyz_refresh_s": 0.2, **extra})


async def readyz(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status_code, response.json()


async def wait_for(
    client: httpx.AsyncClient,
    what: str,
    want: Callable[[int, dict[str, Any]], bool],
    limit_s: float,
) -> dict[str, Any]:
    """Poll /readyz until `want(status, body)`; fail with the last answer after `limit_s`."""
    started = time.monotonic()
    status, body = await readyz(client)
    while not want(status, body):
        if time.monotonic() - started > limit_s:
            pytest.fail(f"/readyz not {what} within {limit_s:.0f}s; last: {status} {body}")
        await asyncio.sleep(0.2)
        status, body = await readyz(client)
    print(f"/readyz {what} after {time.monotonic() - started:.1f}s: {status} {body}")
    return body


def client_for(settings: ApiSettings, store: Store) -> httpx.AsyncClient:
    app = create_app(settings, store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tally")


CODES = {
    "ok",
    "unknown",
    "store_unreachable",
    "kafka_unreachable",
    "no_worker",
    "no_sink",
    "processors_behind",
}


def generic(raw: str) -> bool:
    """Whether a /readyz body holds stable codes only (no error text, no addresses)."""
    body = httpx.Response(200, text=raw).json()
    return (
        set(body) == {"status", "reason", "checks"}
        and body["reason"] in CODES
        and set(body["checks"].values()) <= CODES
    )


def reason(code: str) -> Callable[[int, dict[str, Any]], bool]:
    return lambda status, body: status == 503 and body["reason"] == code


async def test_an_idle_pipeline_is_ready_and_not_once_its_worker_stops(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> None:
    accounts = AccountStore(pipeline_store)
    accounts.create("acme", "pro")
    key, _ = accounts.create_key("acme", admin=False)
    # The usage routes read the store (this test reads what its sink wrote, at once).
    settings = api_settings(pipeline_settings, api_usage_view="off")
    async with client_for(settings, pipeline_store) as client:
        async with running_pipeline(pipeline_settings, pipeline_store):
            body = await wait_for(client, "ready", lambda s, _: s == 200, 30)
            assert body == {
                "status": "ready",
                "reason": None,
                "checks": dict.fromkeys(("store", "kafka", "workers", "sink", "processors"), "ok"),
            }
            # The idle heartbeat keeps the data current without a single event: the
            # delay is that of the last heartbeat to reach the store, not years.
            usage = await client.get("/api/v1/account/usage", headers={"X-API-Key": key})
            assert usage.status_code == 200, usage.text
            delay = float(usage.headers["X-Data-Delay"])
            print(f"X-Data-Delay on an idle pipeline: {delay}s")
            assert 0 <= delay < settings.processors_stale_s
        # The worker left its group as it stopped: no worker, at once (no staleness wait).
        body = await wait_for(client, "no_worker", reason("no_worker"), 15)
        assert body["checks"]["workers"] == "no_worker"


async def test_workers_without_a_sink_are_not_ready(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> None:
    await ensure_rollups_topic(pipeline_settings)
    app, _ = build_app(pipeline_settings)
    async with client_for(api_settings(pipeline_settings), pipeline_store) as client:
        await app.start()
        try:
            body = await wait_for(client, "no_sink", reason("no_sink"), 30)
        finally:
            await app.stop()
    assert body["checks"] == {
        "store": "ok",
        "kafka": "ok",
        "workers": "ok",
        "sink": "no_sink",
        "processors": "unknown",
    }


async def test_a_store_gone_is_named_without_its_error_text(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> None:
    async with client_for(api_settings(pipeline_settings), pipeline_store) as client:
        await wait_for(client, "no_worker", reason("no_worker"), 15)
        pipeline_store.command(f"DROP DATABASE {pipeline_store.database}")
        body = await wait_for(client, "store_unreachable", reason("store_unreachable"), 15)
        raw = (await client.get("/readyz")).text
    assert body["checks"]["store"] == "store_unreachable"
    # What ClickHouse said (its code, the database's name) stays in the log.
    assert generic(raw), raw
    assert pipeline_store.database not in raw


async def test_kafka_gone_is_named(
    tmp_path: Path, pipeline_settings: WorkerSettings, pipeline_store: Store
) -> None:
    broker = LocalKafka(tmp_path / "kafka", KAFKA_LIBS, port=free_port())
    broker.start()
    try:
        settings = api_settings(
            pipeline_settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        )
        async with client_for(settings, pipeline_store) as client:
            await wait_for(client, "no_worker", reason("no_worker"), 30)
            broker.stop()
            body = await wait_for(client, "kafka_unreachable", reason("kafka_unreachable"), 30)
            raw = (await client.get("/readyz")).text
    finally:
        broker.kill()
    assert body["checks"]["kafka"] == "kafka_unreachable"
    assert generic(raw), raw


async def test_readyz_queries_the_store_at_most_once_per_interval(
    pipeline_settings: WorkerSettings, pipeline_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    real = queries.pipeline_marks

    def counted(*args: Any) -> queries.PipelineMarks:
        calls.append(time.monotonic())
        return real(*args)

    monkeypatch.setattr(queries, "pipeline_marks", counted)
    settings = api_settings(pipeline_settings).model_copy(update={"readyz_refresh_s": 60.0})
    async with client_for(settings, pipeline_store) as client:
        answers = await asyncio.gather(*(readyz(client) for _ in range(50)))
        answers += [await readyz(client) for _ in range(50)]
    assert {status for status, _ in answers} == {503}  # no worker in this test
    assert len(calls) == 1, f"{len(calls)} store queries for 100 calls within the interval"


async def test_an_idle_sink_restates_its_markers_with_a_write_time(store: Store) -> None:
    sink = Sink(store, "127.0.0.1:9", "r", "e")  # no Kafka needed to write markers
    sink._gate = sink.gates.take([0, 1])  # as after an assignment of partitions 0 and 1
    sink._positions = {0: 5, 1: 7}
    before = datetime.now(UTC)
    assert queries.pipeline_marks(store, "e", "r").sink_wrote is None
    await sink._mark_alive()
    marks = queries.pipeline_marks(store, "e", "r")
    assert marks.sink_wrote is not None
    assert marks.sink_wrote >= before.replace(microsecond=before.microsecond // 1000 * 1000)
    assert marks.reflected_until is None  # no worker report: nothing about the events
    # Where the sink resumes does not move.
    assert RollupStore(store).resume_offsets("r") == {0: 5, 1: 7}
