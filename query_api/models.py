"""Response bodies, with the contract's examples so /docs shows what users will get."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict


def _example(example: JsonDict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


class WindowUsageOut(BaseModel):
    used_percentage: float = Field(description="100 x units in the window / the plan's limit.")
    resets_at: str | None = Field(description="When the window ends; null when none is running.")


class AccountUsageOut(BaseModel):
    model_config = _example(
        {
            "session": {"used_percentage": 4.0, "resets_at": "2026-03-29T03:00:00.000Z"},
            "weekly": {"used_percentage": 14.3, "resets_at": "2026-03-30T02:00:00.000Z"},
            "plan": "pro",
        }
    )
    session: WindowUsageOut
    weekly: WindowUsageOut
    plan: str


class LimitOut(BaseModel):
    per_minute: int
    remaining: int
    resets_at: str


class RequestsOut(BaseModel):
    today: int
    this_week: int
    this_month: int
    limit: LimitOut


class StreamsOut(BaseModel):
    active: int
    max: int


class PeriodOut(BaseModel):
    start: str
    end: str


class UsageDataOut(BaseModel):
    requests: RequestsOut
    streams: StreamsOut
    period: PeriodOut


class MetaOut(BaseModel):
    updated_at: str = Field(description="The time up to which events are reflected.")


class UsageV1Out(BaseModel):
    model_config = _example(
        {
            "data": {
                "requests": {
                    "today": 342,
                    "this_week": 2105,
                    "this_month": 14523,
                    "limit": {
                        "per_minute": 300,
                        "remaining": 287,
                        "resets_at": "2026-02-08T14:45:00.000Z",
                    },
                },
                "streams": {"active": 2, "max": 10},
                "period": {"start": "2026-02-01T00:00:00.000Z", "end": "2026-02-28T23:59:59.000Z"},
            },
            "meta": {"updated_at": "2026-02-08T14:50:00.123Z"},
        }
    )
    data: UsageDataOut
    meta: MetaOut
