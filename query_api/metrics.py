"""GET /metrics (docs/api.md#health-and-metrics): Prometheus text, with the API's request latencies.

The worker's and sink's counters join the same registry when they run in this
process (`tally up`; see deploy/stack.py).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest
from starlette.types import Scope

REQUEST_SECONDS = Histogram(
    "tally_api_request_seconds",
    "API request latency",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def observe(scope: Scope, status: int, started: float) -> None:
    """One request into REQUEST_SECONDS (query_api/app.py's RequestMiddleware calls it
    once the answer is sent; a request that raised is not observed)."""
    # The route template, not the raw path: ids in paths would explode label sets.
    template = getattr(scope.get("route"), "path", "unmatched")
    REQUEST_SECONDS.labels(template, scope["method"], str(status)).observe(
        time.perf_counter() - started
    )
