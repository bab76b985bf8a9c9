"""Liveness and readiness (docs/api.md#health-and-metrics)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from query_api import queries
from query_api.deps import ServicesDep

router = APIRouter(tags=["health"])


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(
        description='Per dependency ("store", "processors"): "ok", or what is wrong.'
    )


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ReadyOut, "description": "Every check is ok"},
    503: {"model": ReadyOut, "description": "Not ready: the checks say what is not ok"},
}


@router.get("/healthz", summary="The API process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once the store, Kafka and the processors are up",
    # The handler answers a JSONResponse (its status varies), so the body is documented here.
    responses=_READY_RESPONSES,
)
async def readyz(svc: ServicesDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        reflected = await asyncio.to_thread(
            queries.reflected_until, svc.store, svc.settings.events_topic
        )
        checks["store"] = "ok"
    except Exception as exc:
        reflected = None
        checks["store"] = f"unavailable: {exc}"
    # Workers re-state their markers every flush interval while they consume, so
    # a recent marker proves both a live worker and a reachable Kafka.
    if reflected is None:
        checks["processors"] = "no worker has reported yet"
    else:
        age = (svc.now() - reflected).total_seconds()
        stale = age > svc.settings.processors_stale_s
        checks["processors"] = f"behind by {age:.1f}s" if stale else "ok"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )
