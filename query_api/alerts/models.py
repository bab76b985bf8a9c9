"""Request and response bodies of the webhook, alert and forecast endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from query_api.admin_models import ACCOUNT_ID_PATTERN
from query_api.alerts.rules import EVENT_TYPES

EventType = Literal["usage.threshold.crossed", "usage.threshold.projected"]
_DEFAULT_EVENTS: list[EventType] = ["usage.threshold.crossed"]
assert set(EVENT_TYPES) == {"usage.threshold.crossed", "usage.threshold.projected"}


class WebhookCreateIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://hooks.example.com/tally",
                    "events": ["usage.threshold.crossed"],
                    "account": None,
                }
            ]
        },
    )
    url: str = Field(max_length=2048, description="http(s) URL the events are POSTed to.")
    events: list[EventType] = Field(
        default_factory=lambda: _DEFAULT_EVENTS.copy(),
        min_length=1,
        description="Event types to deliver.",
    )
    account: str | None = Field(
        None, pattern=ACCOUNT_ID_PATTERN, description="Only this account's events; null: all."
    )


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    account: str | None
    created_at: str


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(description="`whsec_` + base64: the signing secret, shown only here.")


class WebhookCreatedResponse(BaseModel):
    data: WebhookCreatedOut


class WebhooksOut(BaseModel):
    data: list[WebhookOut]


class WebhookDeletedOut(BaseModel):
    id: str
    deleted: bool


class WebhookDeletedResponse(BaseModel):
    data: WebhookDeletedOut


class AttemptOut(BaseModel):
    attempt: int
    at: str
    status_code: int = Field(description="The HTTP status answered; 0: no answer.")
    latency_ms: float
    error: str


class DeliveryOut(BaseModel):
    id: str = Field(description="The webhook-id, the same on every attempt.")
    event_type: str
    alert_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: str | None = Field(description="When a pending delivery is tried next.")
    last_status_code: int
    created_at: str
    body: str
    log: list[AttemptOut] = Field(description="Its attempts, newest first.")


class DeliveriesOut(BaseModel):
    data: list[DeliveryOut]


class TestDeliveryOut(BaseModel):
    id: str
    delivered: bool
    status_code: int
    latency_ms: float
    error: str


class TestDeliveryResponse(BaseModel):
    data: TestDeliveryOut


class WindowForecastOut(BaseModel):
    used_percentage: float
    projected_percentage: float = Field(
        description="Usage projected at resets_at at the recent rate (may exceed 100)."
    )
    rate_per_hour: float = Field(description="Units per hour over the window's last hour.")
    resets_at: str | None
    exhausted_at: str | None = Field(
        description="When 100 % is reached at that rate; null: not before resets_at."
    )


class ForecastOut(BaseModel):
    session: WindowForecastOut
    weekly: WindowForecastOut


class ForecastResponse(BaseModel):
    data: ForecastOut


class AlertOut(BaseModel):
    id: str
    type: str
    window: str
    threshold: int
    used_percentage: float
    window_start: str
    resets_at: str
    emitted_at: str


class AlertsOut(BaseModel):
    data: list[AlertOut]
