"""A real FastAPI gateway, served by uvicorn, metered by MeteringMiddleware into real Kafka.

Calls of every kind go over HTTP (JSON routes, errors, an exception, unmetered and
unauthenticated calls, server-sent event streams read to the end and one the client
abandons); then the topic must hold exactly the events those calls imply, each valid,
in its account's partition. The second test sends the same traffic through the
processors and checks the rollups they write.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deploy.kafka_local import ensure_topics
from deploy.processes import free_port
from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers.asgi import MeteringMiddleware, MeteringStats, from_header, from_state
from producers.gateway import Gateway
from producers.partitioning import partition_for
from schemas.events import (
    EVENT_ADAPTER,
    MESSAGE_ADAPTER,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
)
from schemas.store import Store
from tests.conftest import consume_all

pytestmark = pytest.mark.integration

PARTITIONS = 4
ACCOUNTS = ("acct-alpha", "acct-beta", "acct-gamma")
SOURCE = "gw-it-1"


def build_app(gateway: Gateway, stats: MeteringStats) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway:  # closed after the middleware drained its queue
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.post("/v1/messages")
    async def messages(request: Request) -> JSONResponse:
        payload = await request.json()
        return JSONResponse({"ok": True}, headers={"x-tally-units": str(payload["cost"])})

    @app.get("/v1/limited")
    async def limited() -> None:
        raise HTTPException(429, "slow down")

    @app.get("/v1/crash")
    async def crash() -> None:
        raise RuntimeError("the endpoint crashed")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/stream")
    async def stream(request: Request, chunks: int, delay: float = 0.0) -> StreamingResponse:
        request.state.tokens = 0

        async def events() -> AsyncIterator[str]:
            for i in range(chunks):
                request.state.tokens += 1  # the stream's cost, read when it closes
                yield f"data: {i}\n\n"
                await asyncio.sleep(delay)

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(
        MeteringMiddleware,
        recorder=gateway,
        source=SOURCE,
        account=from_header("x-account-id"),
        model=from_header("x-model"),
        stream_units=from_state("tokens"),
        stats=stats,
    )
    return app


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn in a thread on a free port; stopped (lifespan shutdown included) on exit.

    Waits without blocking the test's loop, where the processors may be running."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting (is the gateway's Kafka up?)"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 60)
        assert not thread.is_alive(), "uvicorn did not stop within 60 s"


@dataclass
class Expected:
    """What the calls made must have produced."""

    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    """(account, route, status) -> request events."""
    units: Counter[str] = field(default_factory=Counter)
    """account -> units of its request events."""
    streams: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(account, reason) -> closed streams."""
    stream_units: Counter[str] = field(default_factory=Counter)
    """account -> units of its streams that ran to completion."""


async def make_calls(base: str) -> Expected:
    want = Expected()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for n, account in enumerate(ACCOUNTS):
            who = {"x-account-id": account}
            for i in range(5 + n):
                assert (await client.get(f"/v1/items/{i}", headers=who)).status_code == 200
                want.requests[(account, "/v1/items/{item_id}", 200)] += 1
                want.units[account] += 1
            assert (await client.get("/v1/items/nope", headers=who)).status_code == 422
            want.requests[(account, "/v1/items/{item_id}", 422)] += 1
            want.units[account] += 1
            for cost in (0.5, 3):
                response = await client.post(
                    "/v1/messages", json={"cost": cost}, headers={**who, "x-model": "m-large"}
                )
                assert response.status_code == 200
                want.requests[(account, "/v1/messages", 200)] += 1
                want.units[account] += cost
            assert (await client.get("/v1/limited", headers=who)).status_code == 429
            want.requests[(account, "/v1/limited", 429)] += 1
            want.units[account] += 1
            # uvicorn drops the connection after an app exception: don't pool this one.
            crashed = await client.get("/v1/crash", headers={**who, "connection": "close"})
            assert crashed.status_code == 500
            want.requests[(account, "/v1/crash", 500)] += 1
            want.units[account] += 1
            assert (await client.get("/no/such/path", headers=who)).status_code == 404
            want.requests[(account, "unmatched", 404)] += 1
            want.units[account] += 1
            # Neither of these is metered.
            assert (await client.get("/healthz", headers=who)).status_code == 200
            assert (await client.get("/v1/items/1")).status_code == 200
            # Streams read to the end: 4 chunks each, costing 4 units.
            for _ in range(2):
                response = await client.get("/v1/stream", params={"chunks": 4}, headers=who)
                assert response.text.count("data:") == 4
                want.requests[(account, "/v1/stream", 200)] += 1
                want.units[account] += 1
                want.streams[(account, "completed")] += 1
                want.stream_units[account] += 4
        # A client that walks away from an endless stream.
        async with client.stream(
            "GET",
            "/v1/stream",
            params={"chunks": 100_000, "delay": 0.01},
            headers={"x-account-id": ACCOUNTS[0]},
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: 2"):
                    break
        want.requests[(ACCOUNTS[0], "/v1/stream", 200)] += 1
        want.units[ACCOUNTS[0]] += 1
        want.streams[(ACCOUNTS[0], "client_disconnect")] += 1
    return want


async def run_gateway(
    bootstrap: str, topic: str, spool_dir: Path
) -> tuple[Expected, MeteringStats]:
    gateway = Gateway(bootstrap, topic, linger_ms=5, spool_dir=spool_dir)
    stats = MeteringStats()
    app = build_app(gateway, stats)
    async with serving(app) as base:
        want = await make_calls(base)
        # The abandoned stream closes once the server notices the client left.
        deadline = time.monotonic() + 20
        while stats.streams_closed < stats.streams_opened:
            assert time.monotonic() < deadline, f"a stream never closed: {stats}"
            await asyncio.sleep(0.05)
    return want, stats


def events_of(record: Any) -> list[dict[str, Any]]:
    doc = orjson.loads(record.value)
    return doc if isinstance(doc, list) else [doc]


async def test_every_call_is_metered_exactly_once(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    await ensure_topics(kafka_bootstrap, {unique_name: PARTITIONS})
    want, stats = await run_gateway(kafka_bootstrap, unique_name, tmp_path / "spool")

    records = await consume_all(kafka_bootstrap, unique_name, PARTITIONS)
    got: list[RequestEvent | StreamOpenedEvent | StreamClosedEvent] = []
    for record in records:
        MESSAGE_ADAPTER.validate_json(record.value)
        for doc in events_of(record):
            assert partition_for(doc["subject"], PARTITIONS) == record.partition
            got.append(EVENT_ADAPTER.validate_python(doc))
    assert len({e.id for e in got}) == len(got), "every event has an id of its own"
    assert {e.source for e in got} == {SOURCE}

    requests = [e for e in got if isinstance(e, RequestEvent)]
    assert Counter((e.subject, e.data.route, e.data.status) for e in requests) == want.requests
    units: Counter[str] = Counter()
    for e in requests:
        units[e.subject] += e.data.units
        assert e.data.method in {"GET", "POST"}
        assert e.data.latency_ms is not None
    assert units == want.units
    assert {e.data.model for e in requests if e.data.route == "/v1/messages"} == {"m-large"}

    opened = {e.data.stream_id: e for e in got if isinstance(e, StreamOpenedEvent)}
    closed = {e.data.stream_id: e for e in got if isinstance(e, StreamClosedEvent)}
    assert len(opened) == len(closed) == sum(want.streams.values())
    assert set(opened) == set(closed), "every stream opened is closed, under the same id"
    assert all(closed[s].subject == opened[s].subject for s in opened)
    assert Counter((e.subject, e.data.reason) for e in closed.values()) == want.streams
    completed: Counter[str] = Counter()
    for e in closed.values():
        if e.data.reason == "completed":
            completed[e.subject] += e.data.units
        else:
            assert 3 <= e.data.units < 100_000  # the chunks sent before the client left
    assert completed == want.stream_units

    assert stats.events_recorded == len(got)
    assert (stats.events_failed, stats.events_dropped, stats.errors) == (0, 0, 0)
    assert stats.calls_without_account == len(ACCOUNTS)
    assert stats.calls_skipped == len(ACCOUNTS)


def _micro(units: float) -> int:
    return int(Decimal(repr(units)) * 1_000_000)


async def test_metered_calls_reach_the_rollups(
    pipeline_settings: WorkerSettings, pipeline_store: Store, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings, store = pipeline_settings, pipeline_store
    async with running_pipeline(settings, store):
        want, stats = await run_gateway(kafka_bootstrap, settings.events_topic, tmp_path / "s")
        expected_events = stats.events_recorded

        query = (
            "SELECT account, type, route, status, sum(events), sum(units_micro) "
            "FROM rollup_minute WHERE account != '' GROUP BY account, type, route, status"
        )
        deadline = time.monotonic() + 120
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = await asyncio.to_thread(store.query, query)
            if sum(int(r[4]) for r in rows) >= expected_events:
                break
            await asyncio.sleep(1)
        await asyncio.sleep(2)  # anything counted twice would show up by now
        rows = await asyncio.to_thread(store.query, query)

    requests = Counter(
        {(a, route, int(status)): int(n) for a, t, route, status, n, _ in rows if t == REQUEST}
    )
    assert requests == want.requests
    units = Counter[str]()
    for account, kind, _, _, _, micro in rows:
        if kind == REQUEST:
            units[account] += int(micro)
    assert units == Counter({a: _micro(u) for a, u in want.units.items()})
    streams_opened = Counter[str]()
    streams_closed = Counter[str]()
    for account, kind, _, _, n, _ in rows:
        if kind == STREAM_OPENED:
            streams_opened[account] += int(n)
        elif kind == STREAM_CLOSED:
            streams_closed[account] += int(n)
    per_account = Counter[str]()
    for (account, _), n in want.streams.items():
        per_account[account] += n
    assert streams_opened == streams_closed == per_account
