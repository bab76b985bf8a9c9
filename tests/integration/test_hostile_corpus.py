"""The hostile corpus on a live worker: it keeps counting, exactly, and loses nothing.

Every near miss of tests/unit/processors/test_hostile_input.py, in every attribute,
alone and inside batches of valid events, published to one partition (the one an
account's events share, so a message that stopped the worker would stall it for
good), followed by ordinary traffic. The worker must account for every element
(counted, duplicate or dead letter), count the ordinary traffic exactly, and never
stop: it runs in this process, so stopping would end the test run itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from schemas.store import Store
from tests.conftest import consume_all
from tests.unit.processors.test_hostile_input import ATTRIBUTES, NEAR_MISSES, _elements, _with

pytestmark = pytest.mark.integration

ORDINARY = 3_000
ACCOUNTS = 40


def _corpus(now: datetime) -> list[bytes]:
    at = now.strftime("%Y-%m-%dT%H:%M:%SZ")

    def event(i: int) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": f"poison-{i}",
            "source": "gw-hostile",
            "type": "tally.request.v1",
            "subject": "acct-poison",
            "time": at,
            "data": {"units": 1},
        }

    corpus = list(NEAR_MISSES)
    for attribute in ATTRIBUTES:
        for text in NEAR_MISSES:
            n = len(corpus)
            bad = _with(event(n), attribute, text)
            corpus.append(bad)
            corpus.append(b"[" + orjson.dumps(event(n + 1)) + b"," + bad + b"]")
    return corpus


async def test_the_corpus_never_stops_the_worker_and_ordinary_traffic_counts_exactly(
    pipeline_settings: WorkerSettings, pipeline_store: Store, kafka_bootstrap: str
) -> None:
    settings, store = pipeline_settings, pipeline_store
    now = datetime.now(UTC)
    corpus = _corpus(now)
    ordinary = [
        build.request(f"acct-{i % ACCOUNTS}", "gw-ok", units=2.0, time=now) for i in range(ORDINARY)
    ]
    outcomes = sum(_elements(value) for value in corpus) + ORDINARY
    async with running_pipeline(settings, store) as (worker, _):
        raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=2_000_000)
        await raw.start()
        try:
            for value in corpus:
                await raw.send(settings.events_topic, value, key=b"acct-poison")
            await raw.flush()
        finally:
            await raw.stop()
        async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
            for event in ordinary:
                await gateway.record(event)

        stats = worker.stats
        deadline = time.monotonic() + 120
        while stats.counted + stats.duplicates + stats.dead_letters < outcomes:
            assert time.monotonic() < deadline, (stats, outcomes)
            await asyncio.sleep(0.5)
        assert stats.counted + stats.duplicates + stats.dead_letters == outcomes
        assert "decode_failed" not in stats.dlq_by_reason  # no message hit a decoding bug

        want = {f"acct-{a}": (ORDINARY // ACCOUNTS, 2 * ORDINARY // ACCOUNTS) for a in range(40)}
        query = (
            "SELECT account, sum(events), intDiv(sum(units_micro), 1000000) FROM rollup_minute "
            "WHERE account LIKE 'acct-%' AND account != 'acct-poison' GROUP BY account"
        )
        got: dict[str, tuple[int, int]] = {}
        while got != want and time.monotonic() < deadline:
            rows = await asyncio.to_thread(store.query, query)
            got = {a: (int(n), int(u)) for a, n, u in rows}
            await asyncio.sleep(0.5)
        assert got == want

    letters = await consume_all(kafka_bootstrap, settings.dlq_topic, 1)
    assert len(letters) == stats.dead_letters > len(corpus) // 2
    reasons = Counter(dict(r.headers)["tally-reason"].decode() for r in letters)
    assert reasons == Counter(stats.dlq_by_reason)
    # Each dead letter names the message it came from, and holds its bytes: the whole
    # message's, or for one element of a batch, that element's.
    sources = {
        (r.partition, r.offset): r.value
        for r in await consume_all(kafka_bootstrap, settings.events_topic, 8)
    }
    elements = 0
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["tally-reason"] in stats.dlq_by_reason
        assert headers["tally-detail"]
        assert headers["tally-source-topic"] == settings.events_topic
        where = int(headers["tally-source-partition"]), int(headers["tally-source-offset"])
        source = sources[where]
        if "tally-batch-index" in headers:
            elements += 1
            assert letter.value in source
            index = int(headers["tally-batch-index"])
            assert orjson.loads(letter.value) == orjson.loads(source)[index]
        else:
            assert letter.value == source
    assert 0 < elements < len(letters)  # both kinds were met
