"""Request and response bodies of the admin routes (docs/api.md#administration).

Shared by the API and by `tally accounts|keys` (deploy/admin_cli.py), so both print
the same shapes. Times are UTC RFC 3339 with milliseconds and `Z`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

# The events' `subject` rule (docs/api.md#attributes): an account id is the subject.
ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

_KEY_EXAMPLE = "tly_3f9c2a7b1d04_Q2hvb3NlIGEgcmFuZG9tIGtleSBoZXJlIQ"


def _example(example: JsonDict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


def _strict_example(example: JsonDict) -> ConfigDict:
    """Request bodies: unknown fields are an error, not silently ignored."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [example]})


# -- plans -----------------------------------------------------------------------


class PlanOut(BaseModel):
    name: str
    session_hours: float = Field(description="Length of a session window.")
    session_limit: float = Field(description="Units per session.")
    session_anchor: Literal["first_request", "fixed"]
    weekly_limit: float = Field(description="Units per week.")
    weekly_anchor: Literal["fixed", "first_request"]
    per_minute: int = Field(description="Requests per minute.")
    max_streams: int = Field(description="Concurrent streams; 0 = streaming not enabled.")
    alert_thresholds: list[int] = Field(
        description="Percentages of the session and weekly limits that raise an alert."
    )


class PlansOut(BaseModel):
    model_config = _example(
        {
            "data": [
                {
                    "name": "pro",
                    "session_hours": 5.0,
                    "session_limit": 1000.0,
                    "session_anchor": "first_request",
                    "weekly_limit": 10000.0,
                    "weekly_anchor": "fixed",
                    "per_minute": 300,
                    "max_streams": 10,
                    "alert_thresholds": [80, 100],
                }
            ]
        }
    )
    data: list[PlanOut]


# -- accounts --------------------------------------------------------------------


class AccountCreateIn(BaseModel):
    model_config = _strict_example({"id": "acme-corp", "plan": "pro"})
    id: str = Field(
        pattern=ACCOUNT_ID_PATTERN,
        description="The account id: the `subject` its gateways put on events "
        "(1-128 characters of A-Z a-z 0-9 _ . : -).",
    )
    plan: str | None = Field(
        None, description="A plan name (see GET /api/v1/admin/plans); default TALLY_DEFAULT_PLAN."
    )


class AccountCreatedOut(BaseModel):
    id: str
    plan: str
    api_key: str = Field(description="The account's first API key. Shown once: store it now.")


class AccountCreatedResponse(BaseModel):
    model_config = _example({"data": {"id": "acme-corp", "plan": "pro", "api_key": _KEY_EXAMPLE}})
    data: AccountCreatedOut


class AccountOut(BaseModel):
    id: str
    plan: str
    created_at: str


class AccountResponse(BaseModel):
    model_config = _example(
        {"data": {"id": "acme-corp", "plan": "pro", "created_at": "2026-02-01T09:30:00.000Z"}}
    )
    data: AccountOut


class PageMeta(BaseModel):
    next_after: str | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


class AccountsOut(BaseModel):
    model_config = _example(
        {
            "data": [{"id": "acme-corp", "plan": "pro", "created_at": "2026-02-01T09:30:00.000Z"}],
            "meta": {"next_after": None},
        }
    )
    data: list[AccountOut]
    meta: PageMeta


class PlanChangeIn(BaseModel):
    model_config = _strict_example({"plan": "max"})
    plan: str = Field(description="A plan name (see GET /api/v1/admin/plans).")


class PlanChangedOut(BaseModel):
    id: str
    plan: str


class PlanChangedResponse(BaseModel):
    model_config = _example({"data": {"id": "acme-corp", "plan": "max"}})
    data: PlanChangedOut


# -- keys ------------------------------------------------------------------------


class KeyCreateIn(BaseModel):
    """Exactly one of `account` (a key of that account), `"admin": true` (an admin key)
    or `"ingest": true` (an ingest key: sends events for any subject, reads nothing)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"account": "acme-corp"}, {"admin": True}, {"ingest": True}]
        },
    )
    account: str | None = Field(None, description="The account the new key belongs to.")
    admin: bool | None = Field(None, description="true for an admin key (no account).")
    ingest: bool | None = Field(
        None,
        description="true for an ingest key: it may send events (POST /api/v1/events) for "
        "any subject and read nothing.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> KeyCreateIn:
        given = (self.account is not None) + bool(self.admin) + bool(self.ingest)
        if given != 1:
            raise ValueError(
                'give exactly one of "account": "<id>", "admin": true or "ingest": true'
            )
        return self


class KeyCreatedOut(BaseModel):
    key_prefix: str = Field(description="Names the key in listings and for revocation.")
    api_key: str = Field(description="The key. Shown once: store it now.")
    account: str | None
    admin: bool
    ingest: bool = Field(False, description="An ingest key: sends events, reads nothing.")


class KeyCreatedResponse(BaseModel):
    model_config = _example(
        {
            "data": {
                "key_prefix": "3f9c2a7b1d04",
                "api_key": _KEY_EXAMPLE,
                "account": "acme-corp",
                "admin": False,
                "ingest": False,
            }
        }
    )
    data: KeyCreatedOut


class KeyOut(BaseModel):
    key_prefix: str
    account: str | None
    admin: bool
    ingest: bool = Field(False, description="An ingest key: sends events, reads nothing.")
    created_at: str
    revoked_at: str | None


class KeysOut(BaseModel):
    model_config = _example(
        {
            "data": [
                {
                    "key_prefix": "3f9c2a7b1d04",
                    "account": "acme-corp",
                    "admin": False,
                    "ingest": False,
                    "created_at": "2026-02-01T09:30:00.000Z",
                    "revoked_at": None,
                }
            ]
        }
    )
    data: list[KeyOut]


class KeyRevokedOut(BaseModel):
    key_prefix: str
    revoked: bool = True


class KeyRevokedResponse(BaseModel):
    model_config = _example({"data": {"key_prefix": "3f9c2a7b1d04", "revoked": True}})
    data: KeyRevokedOut


# -- totals (reconciliation) -------------------------------------------------------


class AccountTotalsOut(BaseModel):
    account: str
    requests: int = Field(description="Number of tally.request.v1 events.")
    units: float = Field(description="Units of requests plus units of closed streams.")
    units_micro: int = Field(
        description="`units` in integer millionths, exactly as the store sums them (a float "
        "cannot carry every total exactly)."
    )
    events: dict[str, int] = Field(
        description="Events per type; a type with no events in the range is left out."
    )


class TotalsMeta(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from", description="The range start, as understood (UTC).")
    to: str = Field(description="The range end, exclusive, as understood (UTC).")
    minutes_from: str = Field(
        description="The first minute summed: the first minute that starts at or after `from`."
    )
    minutes_to: str = Field(
        description="The end (exclusive) of the minutes summed: the first minute that starts "
        "at or after `to`."
    )
    account: str | None = Field(description="The account asked for; null: every account.")
    accounts: int = Field(description="Number of entries in `data`.")
    topic: str = Field(description="The events topic the worker counts (TALLY_EVENTS_TOPIC).")
    counted_offsets: dict[str, int] | None = Field(
        description="Per partition of `topic`, the next offset not yet counted, read in the "
        "same scan as the totals: the totals reflect exactly the messages below these "
        "offsets. A partition not listed has nothing counted. null: no offsets are stored "
        "for this topic (nothing counted yet, or another worker design)."
    )


class TotalsOut(BaseModel):
    model_config = _example(
        {
            "data": [
                {
                    "account": "acme-corp",
                    "requests": 1520,
                    "units": 2210.5,
                    "units_micro": 2210500000,
                    "events": {
                        "tally.request.v1": 1520,
                        "tally.stream.opened.v1": 12,
                        "tally.stream.closed.v1": 12,
                    },
                }
            ],
            "meta": {
                "from": "2026-03-29T00:00:00.000Z",
                "to": "2026-03-30T00:00:00.000Z",
                "minutes_from": "2026-03-29T00:00:00.000Z",
                "minutes_to": "2026-03-30T00:00:00.000Z",
                "account": None,
                "accounts": 1,
                "topic": "tally.events",
                "counted_offsets": {"0": 48211, "1": 47980},
            },
        }
    )
    data: list[AccountTotalsOut]
    meta: TotalsMeta
