"""The metrics tell the truth: real Kafka, worker, sink and API, known traffic.

Known events (with re-sent duplicates and junk) go through the real pipeline;
the worker's own metrics endpoint (TALLY_METRICS_PORT's server) and the API's
/metrics must then report exactly what was sent: events per type, dead letters
per reason, duplicates dropped, zero lag on every partition that saw traffic,
flush latencies observed, and the API requests made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from deploy.processes import free_port
from deploy.stack import running_pipeline
from processors.app import RollupWorker
from processors.metrics import PipelineCollector, serve_metrics
from processors.settings import WorkerSettings
from processors.sink import Sink
from producers import events as build
from producers.gateway import Gateway
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.logs import JsonFormatter
from schemas.store import Store

pytestmark = pytest.mark.integration

N_UNIQUE = 3_000
N_RESENT = 250

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} from Prometheus text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _traffic(rng: random.Random, now: datetime) -> list[Any]:
    made: list[Any] = []
    for i in range(N_UNIQUE):
        account = f"acct-{rng.randrange(50):03d}"
        source = f"gw-{rng.randrange(3)}"
        at = now - timedelta(seconds=rng.uniform(0, 3_600))
        roll = rng.random()
        if roll < 0.1:
            made.append(build.stream_opened(account, source, f"s{i}", time=at))
        elif roll < 0.15:
            made.append(build.stream_closed(account, source, f"s{i}", units=2.5, time=at))
        else:
            made.append(build.request(account, source, units=1.0, route="/v1/x", time=at))
    return made


def _junk(now: datetime) -> list[tuple[bytes, str]]:
    good = orjson.loads(build.encode_event(build.request("acct-junk", "gw-x", time=now)))

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**good, **changes})

    return [
        (b"{not json", "malformed_json"),
        (b"{not json either", "malformed_json"),
        (b"42", "not_an_event"),
        (variant(type="tally.unknown.v1"), "unknown_type"),
        (variant(time=(now - timedelta(days=40)).isoformat()), "too_late"),
    ]


@pytest.fixture
async def pipeline(
    pipeline_settings: WorkerSettings, pipeline_store: Store
) -> AsyncIterator[tuple[WorkerSettings, Store, RollupWorker, Sink]]:
    async with running_pipeline(pipeline_settings, pipeline_store) as (worker, sink):
        yield pipeline_settings, pipeline_store, worker, sink


async def test_metrics_report_what_was_sent(
    pipeline: tuple[WorkerSettings, Store, RollupWorker, Sink], kafka_bootstrap: str
) -> None:
    settings, store, worker, sink = pipeline
    now = datetime.now(UTC)
    rng = random.Random(6)
    unique = _traffic(rng, now)
    resent = rng.sample(unique, N_RESENT)
    junk = _junk(now)

    # The standalone endpoint, as `tally worker`/`tally sink` serve it.
    port = free_port()
    server, _ = serve_metrics(port, "127.0.0.1", worker, sink)
    # And the API's /metrics, which in `tally up` carries the same collector.
    collector = PipelineCollector(worker, sink)
    REGISTRY.register(collector)
    api_settings = ApiSettings(
        clickhouse_url=settings.store_url, clickhouse_database=settings.store_database
    )
    app = create_app(api_settings, store)
    key, _ = await asyncio.to_thread(_account_key, store)
    try:
        async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
            for event in unique + resent:
                await gateway.record(event)
        raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await raw.start()
        try:
            for value, _ in junk:
                await raw.send_and_wait(settings.events_topic, value, key=b"acct-junk")
        finally:
            await raw.stop()

        want_types = Counter(e.type for e in unique)
        want_reasons = Counter(reason for _, reason in junk)
        used_partitions = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scraper:
            deadline = time.monotonic() + 120
            while True:
                samples = _samples((await scraper.get("/metrics")).text)
                counted = _by_label(samples, "tally_events_counted_total", "type")
                lag = _by_label(samples, "tally_worker_lag_messages", "partition")
                settled = (
                    sum(counted.values()) >= sum(want_types.values())
                    and sum(_by_label(samples, "tally_dead_letters_total", "reason").values())
                    >= len(junk)
                    and lag
                    and all(v == 0 for v in lag.values())
                    and _value(samples, "tally_sink_freshness_seconds") > 0
                )
                if settled or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.5)  # anything counted twice would show by now
            samples = _samples((await scraper.get("/metrics")).text)
            used_partitions = {str(p) for p in worker.lag()}

        assert _by_label(samples, "tally_events_counted_total", "type") == {
            kind: float(n) for kind, n in want_types.items()
        }
        assert _by_label(samples, "tally_dead_letters_total", "reason") == {
            reason: float(n) for reason, n in want_reasons.items()
        }
        assert _value(samples, "tally_duplicates_dropped_total") == N_RESENT
        lag = _by_label(samples, "tally_worker_lag_messages", "partition")
        assert set(lag) == used_partitions
        assert len(lag) > 1
        assert all(v == 0 for v in lag.values()), lag
        assert _value(samples, "tally_worker_commit_seconds_count") > 0
        assert _value(samples, "tally_worker_commit_seconds_bucket", le="+Inf") == _value(
            samples, "tally_worker_commit_seconds_count"
        )
        assert _value(samples, "tally_sink_write_seconds_count") > 0
        assert _value(samples, "tally_sink_write_seconds_sum") > 0
        assert 0 < _value(samples, "tally_sink_freshness_seconds") < 30
        assert _value(samples, "tally_dedup_keys") >= N_UNIQUE
        assert _value(samples, "tally_sink_rows_total") > 0
        assert _value(samples, "process_cpu_seconds_total") > 0

        # The API: its /metrics counts the requests made, by route template and status.
        access = _Lines()
        access_log = logging.getLogger("tally.access")
        access_log.addHandler(access)
        level = access_log.level
        access_log.setLevel(logging.INFO)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api"
            ) as client:
                before = _samples((await client.get("/metrics")).text)
                for _ in range(4):
                    assert (await client.get("/healthz")).status_code == 200
                for _ in range(3):
                    usage = await client.get("/api/v1/account/usage", headers={"X-API-Key": key})
                    assert usage.status_code == 200
                refused = await client.get(
                    "/api/v1/account/usage", headers={"X-Request-Id": "caller-id-1"}
                )
                assert refused.status_code == 401
                after = _samples((await client.get("/metrics")).text)
        finally:
            access_log.removeHandler(access)
            access_log.setLevel(level)

        # One JSON access line per request, with the id the response carried.
        docs = [json.loads(line) for line in access.lines]
        assert len(docs) == 10  # two /metrics, four /healthz, four usage
        assert all(key not in line for line in access.lines)
        served = [d for d in docs if d["path"] == "/api/v1/account/usage" and d["status"] == 200]
        assert [d["request_id"] for d in served][-1] == usage.headers["X-Request-Id"]
        assert {d["account"] for d in served} == {"acct-000"}
        assert all(d["method"] == "GET" and d["duration_ms"] > 0 for d in docs)
        assert docs[-2]["request_id"] == "caller-id-1"
        assert docs[-2]["status"] == 401
        assert docs[-2]["account"] is None

        def grew(route: str, status: str) -> float:
            labels = {"route": route, "method": "GET", "status": status}
            name = "tally_api_request_seconds_count"
            return _value(after, name, **labels) - _value(before, name, **labels)

        assert grew("/healthz", "200") == 4
        assert grew("/api/v1/account/usage", "200") == 3
        assert grew("/api/v1/account/usage", "401") == 1
        # The pipeline's counters are on the API's /metrics too (as in `tally up`).
        assert _by_label(after, "tally_events_counted_total", "type") == {
            kind: float(n) for kind, n in want_types.items()
        }
    finally:
        REGISTRY.unregister(collector)
        server.shutdown()
        server.server_close()


def _account_key(store: Store) -> tuple[str, Any]:
    accounts = AccountStore(store)
    accounts.create("acct-000", "pro")
    return accounts.create_key("acct-000", admin=False)


class _Lines(logging.Handler):
    """The access log as JSON lines, as TALLY_LOG_FORMAT=json writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
