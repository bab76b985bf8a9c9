"""Webhook endpoints' administration, shared by the admin API and its tests.

Creating an endpoint checks its URL (http(s) only; no loopback or private target
unless TALLY_WEBHOOK_ALLOW_PRIVATE) and returns the signing secret once; the store
keeps it only encrypted (query_api/alerts/signing.py). Deleting leaves a tombstone
so the endpoint's delivery log stays readable.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import orjson

from query_api.alerts.dispatch import post
from query_api.alerts.models import (
    AttemptOut,
    DeliveryOut,
    TestDeliveryOut,
    WebhookCreatedOut,
    WebhookCreateIn,
    WebhookOut,
)
from query_api.alerts.rules import TEST
from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox, UnsafeUrlError, check_target, new_secret
from query_api.alerts.store import (
    DELIVERED,
    FAILED,
    PENDING,
    AlertStore,
    Attempt,
    Delivery,
    Endpoint,
)
from query_api.errors import ApiError
from schemas.windows import format_time


def _out(endpoint: Endpoint) -> WebhookOut:
    return WebhookOut(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        account=endpoint.account,
        created_at=format_time(endpoint.created_at),
    )


def _missing(endpoint_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no webhook endpoint {endpoint_id!r}")


async def create(
    alerts: AlertStore, box: SecretBox, settings: AlertSettings, body: WebhookCreateIn
) -> WebhookCreatedOut:
    try:
        await check_target(body.url, settings.webhook_allow_private)
    except UnsafeUrlError as exc:
        raise ApiError(422, "validation_error", f"url: {exc}") from None
    endpoint_id = "whep_" + secrets.token_hex(12)
    secret = new_secret()
    endpoint = Endpoint(
        endpoint_id,
        body.url,
        tuple(dict.fromkeys(body.events)),
        body.account,
        box.seal(endpoint_id, secret),
        datetime.now(UTC),
    )
    await asyncio.to_thread(alerts.put_endpoint, endpoint)
    return WebhookCreatedOut(**_out(endpoint).model_dump(), secret=secret)


def list_endpoints(alerts: AlertStore) -> list[WebhookOut]:
    return [_out(e) for e in alerts.endpoints()]


def delete(alerts: AlertStore, endpoint_id: str) -> None:
    endpoint = alerts.endpoint(endpoint_id)
    if endpoint is None:
        raise _missing(endpoint_id)
    alerts.put_endpoint(endpoint, deleted=True)


def deliveries(alerts: AlertStore, endpoint_id: str, limit: int) -> list[DeliveryOut]:
    if alerts.endpoint(endpoint_id) is None and not alerts.deliveries(endpoint_id, limit=1):
        raise _missing(endpoint_id)
    log: dict[str, list[AttemptOut]] = {}
    for a in alerts.attempts(endpoint_id, limit=limit * 10):
        log.setdefault(a.delivery_id, []).append(
            AttemptOut(
                attempt=a.attempt,
                at=format_time(a.at),
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                error=a.error,
            )
        )
    return [
        DeliveryOut(
            id=d.id,
            event_type=d.event_type,
            alert_id=d.alert_id,
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=format_time(d.next_attempt_at) if d.status == PENDING else None,
            last_status_code=d.last_status_code,
            created_at=format_time(d.created_at),
            body=d.body,
            log=log.get(d.id, []),
        )
        for d in alerts.deliveries(endpoint_id, limit=limit)
    ]


async def send_test(
    alerts: AlertStore, box: SecretBox, settings: AlertSettings, endpoint_id: str
) -> TestDeliveryOut:
    """One signed `webhook.test` message, sent now and not retried; logged like any delivery."""
    endpoint = await asyncio.to_thread(alerts.endpoint, endpoint_id)
    if endpoint is None:
        raise _missing(endpoint_id)
    now = datetime.now(UTC)
    msg_id = "msg_" + secrets.token_hex(16)
    body = orjson.dumps(
        {"type": TEST, "timestamp": format_time(now), "data": {"endpoint": endpoint.id}}
    ).decode()
    async with httpx.AsyncClient(
        timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        outcome = await post(
            client,
            endpoint.url,
            box.open(endpoint.id, endpoint.sealed_secret),
            msg_id,
            body.encode(),
            settings.webhook_allow_private,
            now,
        )
    delivery = Delivery(msg_id, endpoint.id, "", TEST, body, PENDING, 0, now, 0, now)
    delivery = replace(
        delivery,
        status=DELIVERED if outcome.ok else FAILED,
        attempts=1,
        last_status_code=outcome.status_code,
    )
    attempt = Attempt(
        endpoint.id,
        msg_id,
        1,
        now,
        outcome.status_code,
        round(outcome.latency_ms, 3),
        outcome.error,
    )
    await asyncio.to_thread(alerts.log_attempt, attempt)
    await asyncio.to_thread(alerts.put_deliveries, [delivery])
    return TestDeliveryOut(
        id=msg_id,
        delivered=outcome.ok,
        status_code=outcome.status_code,
        latency_ms=round(outcome.latency_ms, 3),
        error=outcome.error,
    )
