"""Liveness and readiness (docs/api.md#health-and-metrics; query_api/readiness.py decides)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from query_api.deps import ServicesDep
from query_api.readiness import Reason

router = APIRouter(tags=["health"])


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    reason: Reason | None = Field(
        description="The first broken link, as a stable code; null when ready."
    )
    checks: dict[str, str] = Field(
        description='Per link ("store", "kafka", "workers", "sink", "processors"): "ok", '
        'the reason code, or "unknown" when an earlier link is broken.'
    )


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ReadyOut, "description": "Every check is ok"},
    503: {"model": ReadyOut, "description": "Not ready: `reason` names the first broken link"},
}


@router.get("/healthz", summary="The API process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 while Kafka, the store, a worker and the sink are up and counting",
    description="Answered from a check at most TALLY_READYZ_REFRESH_S old (no store query "
    "per call). The body carries stable codes only; what the store or Kafka said is logged.",
    # The handler answers a JSONResponse (its status varies), so the body is documented here.
    responses=_READY_RESPONSES,
)
async def readyz(svc: ServicesDep) -> JSONResponse:
    assert svc.readiness is not None  # create_app always sets it
    verdict = await svc.readiness.verdict()
    body = ReadyOut(
        status="ready" if verdict.ready else "not_ready",
        reason=verdict.reason,
        checks=verdict.checks,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if verdict.ready else 503)
