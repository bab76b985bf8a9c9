"""One endpoint as a bare ASGI app, for query_api/app.py's RequestMiddleware to call
without routing (the usage GET and the events POST, the two hottest paths).

It answers exactly as through the router: the same endpoint function, its ApiErrors
through the app's own handler for them (as Starlette's exception middleware would
call it), anything else propagating to the server-error handler, as routed. Routing
and the exception middleware otherwise cost about as much CPU as the answer
(benchmarks/api.py); tests/integration/test_api_fast_path.py compares the two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from query_api.errors import ApiError

Endpoint = Callable[[Request], Awaitable[Response]]


def bare_endpoint(app: FastAPI, router: APIRouter, endpoint: Endpoint) -> tuple[BaseRoute, ASGIApp]:
    """(the router's own route for `endpoint`, `endpoint` as an ASGI app).

    The route object is what routing puts in scope["route"]: the latency histogram
    labels requests with its path, so a bare call is labelled as a routed one.
    """
    route = next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint)
    handler = app.exception_handlers[ApiError]

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        scope["endpoint"] = endpoint
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except ApiError as exc:
            response = await handler(request, exc)  # type: ignore[misc]
        await response(scope, receive, send)

    return route, serve
