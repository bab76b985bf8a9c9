"""`tally reconcile` against a real Kafka log and rollups written by the real worker.

A few thousand events (batched and single, with re-sends and junk) go through the
gateway library into a 4-partition topic; the worker and the sink run in-process
until every event is counted. Reconcile must then find no drift, and the ground
truth computed here, independently of processors/, must equal its recount. One
extra delta row for one account must then be reported as drift for exactly that
account. The admin `/totals` route is checked on the real app.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from deploy.kafka_local import ensure_topics
from deploy.processes import free_port
from deploy.reconcile_cli import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, run_reconcile
from deploy.reconcile_source import ApiTotals, StoreTotals, TotalsSource
from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from query_api.admin_ops import account_totals
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import MARKER_ACCOUNT, offset_markers
from schemas.store import Store
from schemas.windows import format_time
from tests.conftest import worker_settings
from tests.rollups import write_wire
from tests.traffic import Shape, mixed_traffic

pytestmark = pytest.mark.integration

N_UNIQUE = 3_000
N_ACCOUNTS = 40
N_RESENT = 200
ADMIN_KEY = "admin-key-for-reconcile-tests-0123456789"
MINUTE = timedelta(minutes=1)


def _micro(units: float) -> int:
    return int(Decimal(repr(units)) * 1_000_000)


def _minute(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _minute(t)
    return floor if floor == t else floor + MINUTE


@dataclass
class Counted:
    settings: WorkerSettings
    store: Store
    start: datetime
    end: datetime
    expected: dict[str, dict[str, Any]]
    """Per account in the range: requests, units_micro, events per type (ground truth)."""


TRAFFIC = Shape(
    events=N_UNIQUE,
    accounts=N_ACCOUNTS,
    account_digits=3,
    sources=3,
    span_s=3 * 3600,  # the checked range below covers about two of these three hours
    opens=0.05,
    closes=0.09,
    closed_units=lambda rng: {"units": round(rng.uniform(0, 30), 4)},
    request=lambda rng: {
        "units": rng.choice([1.0, 2.0, 0.5, round(rng.uniform(0, 10), 6)]),
        "route": "/v1/x",
    },
)


def _ground_truth(events: list[Any], start: datetime, end: datetime) -> dict[str, dict[str, Any]]:
    since, until = _ceil_minute(start), _ceil_minute(end)
    truth: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "units_micro": 0, "events": defaultdict(int)}
    )
    for event in events:
        if not since <= _minute(event.time) < until:
            continue
        cell = truth[event.subject]
        cell["events"][event.type] += 1
        if event.type == REQUEST:
            cell["requests"] += 1
        if event.type in (REQUEST, STREAM_CLOSED):
            cell["units_micro"] += _micro(event.data.units)
    return {a: {**c, "events": dict(c["events"])} for a, c in truth.items()}


def _junk(now: datetime) -> list[bytes]:
    good = orjson.loads(build.encode_event(build.request("acct-junk", "gw-x", time=now)))

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**good, **changes})

    return [
        b"{not json",
        b"[]",
        variant(subject="has space"),
        variant(time=(now + timedelta(hours=1)).isoformat()),  # time_in_future
        variant(time=(now - timedelta(days=40)).isoformat()),  # too_late
        variant(type="tally.unknown.v1"),
    ]


async def _counted_rows(store: Store) -> int:
    rows = await asyncio.to_thread(
        store.query, "SELECT sum(events) FROM rollup_minute WHERE account != ''"
    )
    return int(rows[0][0] or 0) if rows else 0


@pytest.fixture
async def counted(kafka_bootstrap: str, store_url: str, unique_name: str) -> AsyncIterator[Counted]:
    settings = worker_settings(kafka_bootstrap, store_url, unique_name, worker_flush_interval_s=0.3)
    await ensure_topics(kafka_bootstrap, {settings.events_topic: 4, settings.dlq_topic: 1})
    store = Store(settings.store_url, settings.store_database)
    store.migrate()

    rng = random.Random(20261122)
    now = datetime.now(UTC)
    unique = mixed_traffic(rng, now, TRAFFIC)
    async with Gateway(kafka_bootstrap, settings.events_topic) as gateway:
        for i, event in enumerate(unique):
            if i % 10 == 0:
                await gateway.send_single(event)
            else:
                await gateway.record(event)
        for event in rng.sample(unique, N_RESENT):  # gateway retries
            await gateway.record(event)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        for value in _junk(now):
            await raw.send_and_wait(settings.events_topic, value, key=b"acct-junk")
    finally:
        await raw.stop()

    async with running_pipeline(settings, store):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await _counted_rows(store) >= N_UNIQUE:
                break
            await asyncio.sleep(0.25)
    assert await _counted_rows(store) == N_UNIQUE

    # A range that starts and ends inside a minute: the minutes starting in it count.
    start = now - timedelta(hours=2, seconds=-30)
    end = now - timedelta(minutes=10)
    try:
        yield Counted(settings, store, start, end, _ground_truth(unique, start, end))
    finally:
        store.close()


async def _reconcile(
    counted: Counted, source: TotalsSource, json_output: bool = True, **kwargs: Any
) -> tuple[int, Any, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_reconcile(
        counted.settings,
        counted.start,
        counted.end,
        source,
        json_output=json_output,
        out=out,
        err=err,
        **kwargs,
    )
    text = out.getvalue()
    return code, (json.loads(text) if json_output and text else text), err.getvalue()


def _as_totals(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        e["account"]: {
            "requests": e["requests"],
            "units_micro": e["units_micro"],
            "events": e["events"],
        }
        for e in entries
    }


async def test_reconcile_finds_no_drift_then_exactly_the_corrupted_account(
    counted: Counted,
) -> None:
    store = counted.store
    code, report, err = await _reconcile(counted, StoreTotals(store))
    assert code == EXIT_OK, (report, err)
    assert report["ok"] is True
    assert report["drift"] == []
    want_events = sum(sum(c["events"].values()) for c in counted.expected.values())
    assert report["checked"]["accounts"] == len(counted.expected)
    assert report["checked"]["events"] == want_events
    assert report["checked"]["units_micro"] == sum(
        c["units_micro"] for c in counted.expected.values()
    )
    assert 0 < want_events < N_UNIQUE  # the range cuts the traffic on both sides
    scan = report["scan"]
    assert scan["duplicates"] == N_RESENT
    assert scan["rejected"] == len(_junk(datetime.now(UTC)))
    assert sorted(p["partition"] for p in scan["partitions"]) == [0, 1, 2, 3]
    assert report["minutes_from"] == format_time(_ceil_minute(counted.start))
    assert report["minutes_to"] == format_time(_ceil_minute(counted.end))

    # The rollups the check read are the ground truth, account by account.
    totals = account_totals(
        store, counted.settings.events_topic, counted.start, counted.end, None
    ).model_dump(mode="json")
    assert _as_totals(totals["data"]) == counted.expected

    code, text, _ = await _reconcile(counted, StoreTotals(store), json_output=False)
    assert code == EXIT_OK
    assert text.startswith(f"no drift: {len(counted.expected)} accounts, {want_events:,} events")

    # Published after the worker stopped: not counted yet, so left out on both sides
    # (the check stops at the offsets the rollups reflect) and said on stderr.
    late = [build.request("acct-000", "gw-late", time=counted.start + 3 * MINUTE) for _ in range(5)]
    async with Gateway(counted.settings.bootstrap, counted.settings.events_topic) as gateway:
        for event in late:
            await gateway.send_single(event)
    code, report, err = await _reconcile(counted, StoreTotals(store))
    assert code == EXIT_OK, (report, err)
    assert report["checked"]["events"] == want_events
    assert "5 messages are published but not counted by the worker yet" in err
    assert report["warnings"]

    # One extra delta for one account, in a minute inside the range.
    victim = sorted(counted.expected)[len(counted.expected) // 2]
    minute = _ceil_minute(counted.start) + 5 * MINUTE
    at = int(minute.timestamp())
    row: list[object] = [victim, at, REQUEST, "/v1/x", "", "", 0, "", 1, 250_000]
    row += [0.0, 0, 0, at * 1000, 0]
    await asyncio.to_thread(write_wire, store, [row])

    code, report, err = await _reconcile(counted, StoreTotals(store))
    assert code == EXIT_DRIFT, err
    assert [d["account"] for d in report["drift"]] == [victim]
    differences = {d["measure"]: d for d in report["drift"][0]["differences"]}
    assert {m: d["delta"] for m, d in differences.items()} == {
        "requests": 1,
        "units_micro": 250_000,
        f"events.{REQUEST}": 1,
    }
    assert differences["requests"]["log"] == counted.expected[victim]["requests"]

    code, text, _ = await _reconcile(counted, StoreTotals(store), json_output=False, account=victim)
    assert code == EXIT_DRIFT
    assert text.startswith("drift in 1 of 1 accounts")
    assert victim in text
    assert "+0.25" in text

    # The same answer through the admin API of a running stack (what the CLI uses when
    # the embedded store is held): a real server in this event loop, the CLI's client.
    api_settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=counted.settings.clickhouse_url,
        clickhouse_database=counted.settings.clickhouse_database,
        events_topic=counted.settings.events_topic,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(api_settings, store), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        source = ApiTotals(f"http://127.0.0.1:{port}", ADMIN_KEY)
        try:
            code, report, err = await _reconcile(counted, source)
        finally:
            source.close()
        assert code == EXIT_DRIFT, err
        assert [d["account"] for d in report["drift"]] == [victim]
        assert report["rollups_from"].startswith("the admin API at")
    finally:
        server.should_exit = True
        await serving


async def test_reconcile_exits_2_when_it_cannot_check(
    kafka_bootstrap: str, store_url: str, unique_name: str
) -> None:
    settings = WorkerSettings(
        kafka_bootstrap=kafka_bootstrap,
        events_topic=f"{unique_name}.missing",
        clickhouse_url=store_url,
        clickhouse_database=unique_name,
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    out, err = io.StringIO(), io.StringIO()
    now = datetime.now(UTC)
    try:
        code = await run_reconcile(
            settings, now - timedelta(hours=1), now, StoreTotals(store), out=out, err=err
        )
        assert code == EXIT_ERROR
        message = err.getvalue().strip()
        assert message.count("\n") == 0
        assert "has no topic" in message
        assert "TALLY_EVENTS_TOPIC" in message
        assert out.getvalue() == ""

        # A range holding no minute start is refused before anything is read.
        code = await run_reconcile(
            settings,
            now.replace(second=10),
            now.replace(second=20),
            StoreTotals(store),
            out=out,
            err=err,
        )
        assert code == EXIT_ERROR
        assert "no minute starts" in err.getvalue()
    finally:
        store.close()


# -- the admin route ----------------------------------------------------------------------


@pytest.fixture
async def api(store_url: str, unique_name: str) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store_url,
        clickhouse_database=unique_name,
        events_topic=f"{unique_name}.events",
        default_plan="free",
        plans=None,
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    transport = httpx.ASGITransport(app=create_app(settings, store))
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        yield client, store
    store.close()


async def test_admin_totals_route(api: tuple[httpx.AsyncClient, Store], unique_name: str) -> None:
    client, store = api
    t0 = datetime(2026, 3, 29, 10, 0, tzinfo=UTC)

    def row(account: str, minute: datetime, kind: str, events: int, micro: int) -> list[object]:
        stream = "" if kind == REQUEST else "s1"
        status = 200 if kind == REQUEST else 0
        at = int(minute.timestamp())
        head: list[object] = [account, at, kind, "", "", "", status, stream]
        return [*head, events, micro, 0.0, 0, 0, at * 1000, 0]

    rows = [
        row("acme", t0, REQUEST, 3, 3_000_000),
        row("acme", t0, REQUEST, 2, 500_000),  # an unmerged second delta of the same key
        row("acme", t0 + 5 * MINUTE, STREAM_OPENED, 1, 0),
        row("acme", t0 + 5 * MINUTE, STREAM_CLOSED, 1, 1_250_000),
        row("acme", t0 + 60 * MINUTE, REQUEST, 7, 7_000_000),  # after the range
        row("globex", t0 + 59 * MINUTE, REQUEST, 1, 100_000),
        row("globex", t0 - MINUTE, REQUEST, 9, 9_000_000),  # before the range
        *offset_markers(f"{unique_name}.events", {0: 120, 1: 80}, {}),
        *offset_markers("another.topic", {0: 999}, {}),
    ]
    await asyncio.to_thread(write_wire, store, rows)
    headers = {"X-API-Key": ADMIN_KEY}
    params = {"from": "2026-03-29T10:00:00Z", "to": "2026-03-29T11:00:00Z"}

    response = await client.get("/api/v1/admin/totals", params=params, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] == [
        {
            "account": "acme",
            "requests": 5,
            "units": 4.75,
            "units_micro": 4_750_000,
            "events": {REQUEST: 5, STREAM_CLOSED: 1, STREAM_OPENED: 1},
        },
        {
            "account": "globex",
            "requests": 1,
            "units": 0.1,
            "units_micro": 100_000,
            "events": {REQUEST: 1},
        },
    ]
    assert MARKER_ACCOUNT not in {e["account"] for e in body["data"]}
    assert body["meta"] == {
        "from": "2026-03-29T10:00:00.000Z",
        "to": "2026-03-29T11:00:00.000Z",
        "minutes_from": "2026-03-29T10:00:00.000Z",
        "minutes_to": "2026-03-29T11:00:00.000Z",
        "account": None,
        "accounts": 2,
        "topic": f"{unique_name}.events",
        "counted_offsets": {"0": 120, "1": 80},
    }

    # Minute rule: from 10:00:30 starts with 10:01, so acme's 10:00 requests drop out;
    # an end inside 10:59 keeps that minute.
    response = await client.get(
        "/api/v1/admin/totals",
        params={"from": "2026-03-29T10:00:30Z", "to": "2026-03-29T10:58:01Z", "account": "acme"},
        headers=headers,
    )
    body = response.json()
    assert body["data"] == [
        {
            "account": "acme",
            "requests": 0,
            "units": 1.25,
            "units_micro": 1_250_000,
            "events": {STREAM_CLOSED: 1, STREAM_OPENED: 1},
        }
    ]
    assert body["meta"]["minutes_from"] == "2026-03-29T10:01:00.000Z"
    assert body["meta"]["minutes_to"] == "2026-03-29T10:59:00.000Z"
    assert body["meta"]["account"] == "acme"

    response = await client.get(
        "/api/v1/admin/totals", params={**params, "account": "nobody"}, headers=headers
    )
    assert response.json()["data"] == []

    # Errors: the envelope, for bad ranges, bad ids, no key and an account key.
    for bad in (
        {"from": params["to"], "to": params["from"]},
        {"from": "2026-03-29T10:00:00", "to": params["to"]},
        {**params, "account": "has space"},
        {"to": params["to"]},
    ):
        response = await client.get("/api/v1/admin/totals", params=bad, headers=headers)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "validation_error"
    response = await client.get("/api/v1/admin/totals", params=params)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    created = await client.post(
        "/api/v1/admin/accounts", json={"id": "acme", "plan": "free"}, headers=headers
    )
    account_key = created.json()["data"]["api_key"]
    response = await client.get(
        "/api/v1/admin/totals", params=params, headers={"X-API-Key": account_key}
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"

    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/api/v1/admin/totals"]["get"]
    for status in ("401", "403", "422"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorBody")
    assert "counted_offsets" in operation["description"]
    assert spec["components"]["schemas"]["TotalsOut"]["examples"]
