"""POST /api/v1/events (docs/api.md#events-over-http) on the real app, a real store and
the session's real Kafka: ingest keys, the 202 and what Kafka then holds, and every
error code of the route.

Kafka going away mid-run and a SIGKILL right after a 202 are tests/integration/
test_ingest_outage.py (they need a broker and an API process of their own).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from deploy.processes import free_port
from producers import events as build
from producers.events import encode_event
from producers.partitioning import partition_for
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.ingest import BATCH, JSON, RETRY_AFTER_S, SINGLE
from query_api.settings import ApiSettings
from schemas.store import Store
from tests.conftest import MakeTopics, consume_all

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-for-ingest-tests-0123456789"
PARTITIONS = 4
PATH = "/api/v1/events"


@dataclass
class Api:
    client: httpx.AsyncClient
    topic: str
    bootstrap: str
    ingest_key: str
    account_key: str


async def _app(
    settings: ApiSettings, store: Store, fast_path: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings, store, fast_path=fast_path)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            yield client, app
    finally:
        # No lifespan under ASGITransport: close the producer the way shutdown does.
        await app.state.services.ingest.publisher.close()


async def _settings(
    store: Store, kafka_bootstrap: str, unique_name: str, make_topics: MakeTopics, **extra: Any
) -> ApiSettings:
    """An API with ADMIN_KEY on `store`, publishing to a fresh `<unique_name>.events`
    topic of PARTITIONS partitions on the shared broker, plus `extra` settings."""
    topic = f"{unique_name}.events"
    await make_topics(kafka_bootstrap, {topic: PARTITIONS})
    return ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        kafka_bootstrap=kafka_bootstrap,
        events_topic=topic,
        **extra,
    )


@pytest.fixture(params=[True, False], ids=["fast-path", "routed"])
async def api(
    request: pytest.FixtureRequest,
    store: Store,
    kafka_bootstrap: str,
    unique_name: str,
    make_topics: MakeTopics,
) -> AsyncIterator[Api]:
    """The app as served (the route called without routing, query_api/app.py
    RequestMiddleware) and through FastAPI's router: both must answer alike."""
    settings = await _settings(
        store, kafka_bootstrap, unique_name, make_topics,
        ingest_max_body_bytes=200_000, ingest_max_events=150,
    )  # fmt: skip
    accounts = AccountStore(store)
    accounts.create("acme", "pro")
    account_key, _ = accounts.create_key("acme", admin=False)
    async for client, _ in _app(settings, store, fast_path=request.param):
        made = await client.post(
            "/api/v1/admin/keys", json={"ingest": True}, headers={"X-API-Key": ADMIN_KEY}
        )
        assert made.status_code == 201, made.text
        yield Api(
            client,
            settings.events_topic,
            kafka_bootstrap,
            made.json()["data"]["api_key"],
            account_key,
        )


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "docs"}
    assert error["code"] == code
    message: str = error["message"]
    return message


def _traffic(n: int, seed: int = 1) -> list[Any]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    made: list[Any] = []
    for i in range(n):
        subject = f"acct-{rng.randrange(40)}"
        t = now - timedelta(seconds=rng.randrange(3_600))
        kind = i % 10
        if kind < 8:
            made.append(build.request(subject, "gw-http", units=rng.choice([1.0, 2.5]), time=t))
        elif kind == 8:
            made.append(build.stream_opened(subject, "gw-http", f"s{i}", time=t))
        else:
            made.append(build.stream_closed(subject, "gw-http", f"s{i}", units=3.0, time=t))
    return made


def _body(events: list[Any], extra: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    return b"[" + b",".join([encode_event(e) for e in events] + list(extra)) + b"]"


async def _on_kafka(bootstrap: str, topic: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every event on the topic by (source, id); each in its subject's partition, once."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for record in await consume_all(bootstrap, topic, PARTITIONS):
        doc = orjson.loads(record.value)
        for event in doc if isinstance(doc, list) else [doc]:
            assert partition_for(event["subject"], PARTITIONS) == record.partition
            key = (event["source"], event["id"])
            assert key not in found
            found[key] = event
    return found


async def test_a_202_means_kafka_holds_every_accepted_event(api: Api) -> None:
    events = _traffic(120)
    junk = [b"1", b'{"specversion": "1.0", "subject": "acct-1"}']
    headers = {"X-API-Key": api.ingest_key, "Content-Type": BATCH}
    answer = await api.client.post(PATH, content=_body(events, junk), headers=headers)
    assert answer.status_code == 202, answer.text
    data = answer.json()["data"]
    assert data["accepted"] == 120
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [
        (120, "not_an_event"),
        (121, "missing_attribute"),
    ]
    # One more, alone, with the Bearer scheme and the single-event media type.
    one = build.request("acct-x", "gw-http", units=4.0)
    single = await api.client.post(
        PATH,
        content=encode_event(one),
        headers={"Authorization": f"Bearer {api.ingest_key}", "Content-Type": SINGLE},
    )
    assert single.status_code == 202, single.text
    assert single.json() == {"data": {"accepted": 1, "rejected": []}}
    # Without waiting: Kafka acknowledged them before the answers left.
    found = await _on_kafka(api.bootstrap, api.topic)
    want = {(e.source, e.id): orjson.loads(encode_event(e)) for e in [*events, one]}
    assert found == want


async def test_an_admin_key_may_send_events_and_an_account_key_may_not(api: Api) -> None:
    body = _body(_traffic(3))
    admin = await api.client.post(
        PATH, content=body, headers={"X-API-Key": ADMIN_KEY, "Content-Type": JSON}
    )
    assert admin.status_code == 202, admin.text
    assert admin.json()["data"] == {"accepted": 3, "rejected": []}
    refused = await api.client.post(
        PATH, content=body, headers={"X-API-Key": api.account_key, "Content-Type": JSON}
    )
    assert "ingest key" in _error(refused, 403, "forbidden")


async def test_an_ingest_key_reads_nothing(api: Api) -> None:
    key = {"X-API-Key": api.ingest_key}
    for path in (
        "/api/v1/account/usage",
        "/api/account/usage",
        "/api/v1/analytics/usage?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
    ):
        _error(await api.client.get(path, headers=key), 403, "forbidden")
    _error(await api.client.get("/api/v1/admin/plans", headers=key), 403, "forbidden")
    listed = await api.client.get("/api/v1/admin/keys", headers={"X-API-Key": ADMIN_KEY})
    kinds = {(k["account"], k["admin"], k["ingest"]) for k in listed.json()["data"]}
    assert kinds == {("acme", False, False), (None, False, True)}


async def test_each_error_code_of_the_route(api: Api) -> None:
    key = api.ingest_key
    valid = encode_event(build.request("acct-1", "gw-http"))
    for content, kind in [
        (b"{not json", JSON),
        (b"42", JSON),
        (b"[]", BATCH),
        (b"[" + valid + b"]", SINGLE),
        (valid, "text/plain"),
    ]:
        answer = await api.client.post(
            PATH, content=content, headers={"X-API-Key": key, "Content-Type": kind}
        )
        _error(answer, 400, "invalid_body")
    for headers in ({}, {"X-API-Key": "tly_000000000000_" + "x" * 32}):
        answer = await api.client.post(
            PATH, content=valid, headers={**headers, "Content-Type": SINGLE}
        )
        assert _error(answer, 401, "unauthorized") == "Invalid or missing API key"
    too_big = b"[" + b",".join([valid] * 2_000) + b"]"  # over 200,000 bytes
    assert len(too_big) > 200_000
    answer = await api.client.post(
        PATH, content=too_big, headers={"X-API-Key": key, "Content-Type": BATCH}
    )
    assert "TALLY_INGEST_MAX_BODY_BYTES" in _error(answer, 413, "payload_too_large")
    too_many = _body(_traffic(151))
    answer = await api.client.post(
        PATH, content=too_many, headers={"X-API-Key": key, "Content-Type": BATCH}
    )
    assert "TALLY_INGEST_MAX_EVENTS" in _error(answer, 413, "payload_too_large")
    # Nothing of these reached Kafka.
    assert await _on_kafka(api.bootstrap, api.topic) == {}


async def test_no_kafka_is_503_with_retry_after(store: Store, unique_name: str) -> None:
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store.url,
        clickhouse_database=store.database,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",  # nobody listens there
        events_topic=f"{unique_name}.events",
        ingest_timeout_s=2.0,
    )
    async for client, _ in _app(settings, store):
        answer = await client.post(
            PATH,
            content=_body(_traffic(5)),
            headers={"X-API-Key": ADMIN_KEY, "Content-Type": BATCH},
        )
        assert "none was accepted" in _error(answer, 503, "unavailable")
        assert answer.headers["Retry-After"] == str(RETRY_AFTER_S)


async def test_a_valid_key_sends_bodies_beyond_the_api_rate_limit(
    store: Store, kafka_bootstrap: str, unique_name: str, make_topics: MakeTopics
) -> None:
    settings = await _settings(
        store, kafka_bootstrap, unique_name, make_topics, api_rate_burst=2, api_rate_per_s=0.001
    )
    async for client, _ in _app(settings, store):
        key = {"X-API-Key": ADMIN_KEY, "Content-Type": BATCH}
        for n in range(5):
            sent = await client.post(PATH, content=_body(_traffic(3, seed=n)), headers=key)
            assert sent.status_code == 202, sent.text
        # Reads still spend the key's budget, and a wrong key its address's.
        statuses = [
            (await client.get("/api/v1/admin/plans", headers=key)).status_code for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        wrong = {"X-API-Key": "tly_000000000000_" + "x" * 32, "Content-Type": BATCH}
        body = _body(_traffic(1))
        answers = [
            (await client.post(PATH, content=body, headers=wrong)).status_code for _ in range(3)
        ]
        assert answers == [401, 401, 429]
