"""One gateway process of tests/e2e/test_enforcement.py: a FastAPI app behind
MeteringMiddleware with enforcement, publishing through a real Gateway.

Run as `uvicorn --factory tests.e2e.enforce_gateway:create`; configured by the
TALLY_* environment (Kafka, topic, TALLY_ENFORCE_*) and GW_SOURCE. `GET /work?units=u`
answers with `x-tally-units: u`, so each call charges what the test asks.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

from producers.asgi import MeteringMiddleware, from_header
from producers.enforcement_sync import Enforcement
from producers.gateway import Gateway


def create() -> FastAPI:
    gateway = Gateway(spool=False, linger_ms=5)
    enforcement = Enforcement.from_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/work")
    async def work(units: float = 1.0) -> Response:
        return Response(b"ok", headers={"x-tally-units": repr(units)})

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        return {
            "unsynced_allowed": enforcement.stats.unsynced_allowed,
            "syncs": enforcement.stats.syncs,
            "sync_failures": enforcement.stats.sync_failures,
            "sync_seconds_max": enforcement.stats.sync_seconds_max,
            # What the sync sends Tally: > 0 once the Gateway knows the topic, so each
            # account's own partition decides which local uses Tally holds.
            "partitions": enforcement.partitions() if enforcement.partitions else -1,
        }

    app.add_middleware(
        MeteringMiddleware,
        recorder=gateway,
        source=os.environ.get("GW_SOURCE", "gw-e2e"),
        account=from_header("x-account-id"),
        unmetered_paths=("/stats",),
        enforcement=enforcement,
    )
    return app
