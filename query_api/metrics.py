"""GET /metrics (CONTRACT §3): Prometheus text, with the API's request latencies.

The worker's and sink's counters join the same registry when they run in this
process (`tally up`; see deploy/stack.py).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class TimingMiddleware:
    """Observes REQUEST_SECONDS per request. Plain ASGI: Starlette's
    BaseHTTPMiddleware costs more CPU per request than a usage answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # An exception propagates unobserved, as a response that never started.
        await self.app(scope, receive, send_status)
        # The route template, not the raw path: ids in paths would explode label sets.
        template = getattr(scope.get("route"), "path", "unmatched")
        REQUEST_SECONDS.labels(template, scope["method"], str(status)).observe(
            time.perf_counter() - started
        )


def install(app: FastAPI) -> None:
    app.add_middleware(TimingMiddleware)
