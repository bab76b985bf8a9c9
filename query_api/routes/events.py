"""POST /api/v1/events (docs/api.md#events-over-http): events over HTTP, for gateways
that cannot publish to Kafka. The checks and the publishing are query_api/ingest.py."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from query_api.deps import Services, authenticate, ingest_principal, services
from query_api.errors import RATE_LIMITED_RESPONSE, ApiError, ErrorBody
from query_api.guard import RequestGuard
from query_api.ingest import BATCH, JSON, SINGLE, check_body
from query_api.routes.bare import bare_endpoint
from schemas.events import EVENT_ADAPTER

router = APIRouter(tags=["events"])

PATH = "/api/v1/events"


class RejectedOut(BaseModel):
    index: int = Field(description="Position of the element in the body (0 for one event).")
    code: str = Field(
        description="The dead-letter reason: missing_attribute, invalid_attribute, "
        "unknown_type, unsupported_specversion, time_in_future, too_late, oversized, "
        "not_an_event."
    )
    message: str


class IngestedOut(BaseModel):
    accepted: int = Field(description="Events Kafka acknowledged: they will be counted.")
    rejected: list[RejectedOut] = Field(description="Elements not accepted, by index.")


class IngestedResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": {
                        "accepted": 98,
                        "rejected": [
                            {
                                "index": 3,
                                "code": "invalid_attribute",
                                "message": "subject: String should match pattern "
                                "'^[A-Za-z0-9_.:-]{1,128}$'",
                            }
                        ],
                    }
                }
            ]
        }
    )
    data: IngestedOut


_EVENT = {"$ref": "#/components/schemas/CloudEvent"}
_ERRORS: dict[int | str, dict[str, object]] = {
    400: {
        "model": ErrorBody,
        "description": "invalid_body: not JSON, neither an event nor an array, an empty "
        "array, or a Content-Type other than the three accepted",
    },
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {
        "model": ErrorBody,
        "description": "An account key: sending events needs an ingest key or an admin key",
    },
    413: {
        "model": ErrorBody,
        "description": "payload_too_large: over TALLY_INGEST_MAX_BODY_BYTES (default 1 MiB) "
        "or TALLY_INGEST_MAX_EVENTS events (default 1,000)",
    },
    503: {
        "model": ErrorBody,
        "description": "unavailable: Kafka did not acknowledge the events in time; none "
        "was accepted. Retry after Retry-After seconds (re-sent events count once).",
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
    },
    **RATE_LIMITED_RESPONSE,
}

DESCRIPTION = """
Send usage events over HTTP, for gateways that cannot publish to Kafka. Needs an
**ingest key** (`POST /api/v1/admin/keys` with `{"ingest": true}`) or an admin key.

The body is one CloudEvent (`application/cloudevents+json`), a JSON array of them
(`application/cloudevents-batch+json`), or either as `application/json`; every rule of
the events on Kafka applies, and events of any subjects may be mixed: the server places
each on its account's partition.

**202** only once Kafka acknowledged every accepted event (acks=all, idempotent): the
events will be counted. Elements that are not valid are listed in `rejected`, by index,
with the dead-letter reason; the valid ones are accepted. Re-sending an event (same
`source` and `id`) is safe: it is counted once.
"""


@router.post(
    PATH,
    status_code=202,
    response_model=IngestedResponse,
    responses=_ERRORS,
    summary="Send events (one CloudEvent or a batch); 202 once Kafka has them",
    description=DESCRIPTION,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                SINGLE: {"schema": _EVENT},
                BATCH: {"schema": {"type": "array", "items": _EVENT, "minItems": 1}},
                JSON: {
                    "schema": {"oneOf": [_EVENT, {"type": "array", "items": _EVENT, "minItems": 1}]}
                },
            },
        }
    },
)
async def post_events(request: Request) -> Response:
    # The hot path, as routes/usage.py's: the caller is resolved by calling the
    # dependencies rather than declaring them, and the body is read raw (the native
    # check parses it), not by FastAPI.
    svc = await services(request)
    await ingest_principal(await authenticate(request, svc, charge=False))
    ingest = svc.ingest
    if ingest is None:
        raise ApiError(503, "unavailable", "this API process does not take events")
    raw = await request.body()
    checked = check_body(
        raw, request.headers.get("content-type"), svc.now(), ingest.limits, ingest.max_events
    )
    await ingest.publisher.publish(checked.events)
    body = {
        "data": {
            "accepted": len(checked.events),
            "rejected": [
                {"index": r.index, "code": r.code, "message": r.message} for r in checked.rejected
            ],
        }
    }
    return Response(orjson.dumps(body), status_code=202, media_type="application/json")


def install_schemas(app: FastAPI) -> None:
    """Put the CloudEvent schema (the models of schemas/events.py, as
    schemas/event.schema.json has it) into the app's OpenAPI components, where the
    request body above refers to it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            event = EVENT_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
            found = schema.setdefault("components", {}).setdefault("schemas", {})
            found.update(event.pop("$defs", {}))
            found["CloudEvent"] = event
        built: dict[str, Any] = app.openapi_schema or {}
        return built

    app.openapi = openapi  # type: ignore[method-assign]


def fast_routes(app: FastAPI, svc: Services) -> dict[str, tuple[BaseRoute, ASGIApp]]:
    """`POST /api/v1/events` as a bare ASGI app (routes/bare.py), behind the same
    RequestGuard the routed app has: the body bound and the key checked before the
    body is read."""
    route, serve = bare_endpoint(app, router, post_events)
    return {PATH: (route, RequestGuard(serve, services=svc))}
