"""Webhook endpoints (docs/api.md#alerts-and-webhooks): admin keys only.

Thin wrappers around query_api/alerts/admin.py; the data access is
query_api/alerts/store.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from query_api.alerts import admin as ops
from query_api.alerts.models import (
    DeliveriesOut,
    TestDeliveryResponse,
    WebhookCreatedResponse,
    WebhookCreateIn,
    WebhookDeletedOut,
    WebhookDeletedResponse,
    WebhooksOut,
)
from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox
from query_api.alerts.store import AlertStore
from query_api.deps import NO_STORE_HEADER, AdminDep, ServicesDep, no_store
from query_api.errors import PAYLOAD_TOO_LARGE_RESPONSE, RATE_LIMITED_RESPONSE, ErrorBody

router = APIRouter(prefix="/api/v1/admin/webhooks", tags=["webhooks"])

_AUTH: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An account key: these routes need an admin key"},
    **RATE_LIMITED_RESPONSE,
}
_404: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "No such webhook endpoint"}
}
_422: dict[int | str, dict[str, object]] = {
    422: {
        "model": ErrorBody,
        "description": "A field is invalid, or the URL is not http(s) or targets a "
        "loopback/private address (SSRF; TALLY_WEBHOOK_ALLOW_PRIVATE)",
    }
}


@dataclass(frozen=True)
class Webhooks:
    settings: AlertSettings
    box: SecretBox
    alerts: AlertStore


async def webhooks(request: Request, svc: ServicesDep) -> Webhooks:
    """The app's webhook context, made on first use (tests may set app.state.webhooks)."""
    found: Webhooks | None = getattr(request.app.state, "webhooks", None)
    if found is None:
        settings = AlertSettings()
        box = await asyncio.to_thread(SecretBox.from_settings, settings)
        found = Webhooks(settings, box, AlertStore(svc.store))
        request.app.state.webhooks = found
    return found


WebhooksDep = Annotated[Webhooks, Depends(webhooks)]


@router.post(
    "",
    response_model=WebhookCreatedResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {"description": "Created; the secret is in the body", "headers": NO_STORE_HEADER},
        **_AUTH,
        **PAYLOAD_TOO_LARGE_RESPONSE,
        **_422,
    },
    dependencies=[Depends(no_store)],
    summary="Add a webhook endpoint (its signing secret is shown once)",
)
async def post_webhook(
    body: WebhookCreateIn, caller: AdminDep, hooks: WebhooksDep
) -> WebhookCreatedResponse:
    created = await ops.create(hooks.alerts, hooks.box, hooks.settings, body)
    return WebhookCreatedResponse(data=created)


@router.get("", response_model=WebhooksOut, responses=_AUTH, summary="Webhook endpoints")
async def get_webhooks(caller: AdminDep, hooks: WebhooksDep) -> WebhooksOut:
    return WebhooksOut(data=await asyncio.to_thread(ops.list_endpoints, hooks.alerts))


@router.delete(
    "/{endpoint_id}",
    response_model=WebhookDeletedResponse,
    responses={**_AUTH, **_404},
    summary="Delete a webhook endpoint (its pending deliveries are dropped)",
)
async def delete_webhook(
    endpoint_id: str, caller: AdminDep, hooks: WebhooksDep
) -> WebhookDeletedResponse:
    await asyncio.to_thread(ops.delete, hooks.alerts, endpoint_id)
    return WebhookDeletedResponse(data=WebhookDeletedOut(id=endpoint_id, deleted=True))


@router.post(
    "/{endpoint_id}/test",
    response_model=TestDeliveryResponse,
    responses={**_AUTH, **_404},
    summary="Send a signed webhook.test message now (not retried) and say what came back",
)
async def test_webhook(
    endpoint_id: str, caller: AdminDep, hooks: WebhooksDep
) -> TestDeliveryResponse:
    result = await ops.send_test(hooks.alerts, hooks.box, hooks.settings, endpoint_id)
    return TestDeliveryResponse(data=result)


@router.get(
    "/{endpoint_id}/deliveries",
    response_model=DeliveriesOut,
    responses={**_AUTH, **_404, **_422},
    summary="An endpoint's recent deliveries with their attempts (status codes, latencies)",
)
async def get_deliveries(
    endpoint_id: str,
    caller: AdminDep,
    hooks: WebhooksDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Deliveries, newest first.")] = 100,
) -> DeliveriesOut:
    found = await asyncio.to_thread(ops.deliveries, hooks.alerts, endpoint_id, limit)
    return DeliveriesOut(data=found)
