"""Plans (docs/api.md#plans): what an account may use. Pure; defaults overridable by TALLY_PLANS.

TALLY_PLANS is a JSON object of plan name -> fields. A field given for a shipped
plan replaces that field only; a new name defines a new plan (missing fields
take the `free` plan's values).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from query_api.exceptions import PlanConfigError


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    session_hours: float = Field(gt=0, le=24 * 31)
    session_limit: float = Field(ge=0, description="Units per session.")
    session_anchor: Literal["first_request", "fixed"]
    weekly_limit: float = Field(ge=0, description="Units per week.")
    weekly_anchor: Literal["fixed", "first_request"]
    per_minute: int = Field(ge=0, description="Requests per minute.")
    max_streams: int = Field(ge=0, description="Concurrent streams; 0 = streaming not enabled.")
    alert_thresholds: tuple[int, ...] = Field(
        (80, 100),
        max_length=10,
        description="Percentages of the session and weekly limits at which a "
        "usage.threshold.crossed alert is emitted (docs/alerts.md).",
    )

    @model_validator(mode="after")
    def _whole_minutes(self) -> Plan:
        # Windows are built from per-minute rollups, so their lengths must be too.
        if abs(self.session_hours * 60 - round(self.session_hours * 60)) > 1e-9:
            raise ValueError("session_hours must be a whole number of minutes (e.g. 5 or 0.5)")
        return self

    @model_validator(mode="after")
    def _thresholds(self) -> Plan:
        # Each threshold names one alert per window: duplicates would be one alert
        # under two names, and the identity (docs/alerts.md) needs whole percentages.
        if any(not 1 <= t <= 1000 for t in self.alert_thresholds):
            raise ValueError("alert_thresholds must be whole percentages in 1..1000")
        if list(self.alert_thresholds) != sorted(set(self.alert_thresholds)):
            raise ValueError("alert_thresholds must be ascending and distinct, e.g. [80, 100]")
        return self

    @property
    def session_minutes(self) -> int:
        return round(self.session_hours * 60)


DEFAULT_PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan(
            name="free",
            session_hours=5,
            session_limit=100,
            session_anchor="first_request",
            weekly_limit=1_000,
            weekly_anchor="fixed",
            per_minute=60,
            max_streams=2,
        ),
        Plan(
            name="pro",
            session_hours=5,
            session_limit=1_000,
            session_anchor="first_request",
            weekly_limit=10_000,
            weekly_anchor="fixed",
            per_minute=300,
            max_streams=10,
        ),
        Plan(
            name="max",
            session_hours=5,
            session_limit=5_000,
            session_anchor="first_request",
            weekly_limit=50_000,
            weekly_anchor="fixed",
            per_minute=1_000,
            max_streams=50,
        ),
    )
}


def load_plans(overrides: str | None) -> dict[str, Plan]:
    """The shipped plans with TALLY_PLANS applied; every problem reported at once."""
    if not overrides:
        return dict(DEFAULT_PLANS)
    try:
        doc: Any = orjson.loads(overrides)
    except orjson.JSONDecodeError as exc:
        raise PlanConfigError(f"TALLY_PLANS is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PlanConfigError("TALLY_PLANS must be a JSON object of plan name -> fields")
    plans = dict(DEFAULT_PLANS)
    problems = []
    for name, fields in doc.items():
        if not isinstance(fields, dict):
            problems.append(f"{name}: expected an object of plan fields")
            continue
        base = plans.get(name, DEFAULT_PLANS["free"]).model_dump()
        try:
            plans[name] = Plan.model_validate({**base, **fields, "name": name})
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                where = ".".join(str(p) for p in error["loc"]) or "plan"
                problems.append(f"{name}.{where}: {error['msg']}")
    if problems:
        raise PlanConfigError("TALLY_PLANS has problems: " + "; ".join(problems))
    return plans
