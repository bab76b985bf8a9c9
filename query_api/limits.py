"""Limits as the API reports them: one computed value per answer, and its headers.

Two limits are reported:

- The plan's (docs/api.md#usage, #rate-limit-headers): `per_minute` requests per UTC minute and
  `max_streams` concurrent streams, on both usage endpoints. `PlanLimits` is computed
  once per answer from the same `AccountUsage` (query_api/usage.py) the body shows;
  the body's `limit` object, `X-RateLimit-*` and the §7 fields are all read from it,
  so they cannot disagree. Its minute is `schemas.windows.minute_window` and its
  count the requests rolled up for that minute: the window and count the gateway's
  enforcement (producers/enforcement.py, fed by POST /api/v1/admin/limits, which
  computes this very value) uses, so what an account is shown is what it is held to.
- The API's own per-caller token bucket (query_api/ratelimit.py), reported only on
  the 429 it causes, as the limit that refused the request.

The §7 fields (draft-ietf-httpapi-ratelimit-headers) are RFC 9651 Lists, serialized
with http-sf in schemas/ratelimit_fields.py, which the gateway's enforcement shares
(producers may not import query_api). Policies are named by sf-strings:

    RateLimit-Policy: "minute";q=300;w=60, "streams";q=10;qu="concurrent-requests"
    RateLimit: "minute";r=287;t=13, "streams";r=8

A plan with `max_streams` 0 (streaming not enabled) keeps the "streams" item, with
q=0 and r=0: an absent policy would read as "no limit", while the truth, which the
body's `"max": 0` also says, is that no stream may be opened.

`t` is X-RateLimit-Reset seen from now: the whole seconds from now to that instant,
rounded up, so a client that waits `t` seconds is past the reset, never before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from query_api.plans import Plan
from query_api.ratelimit import Decision
from query_api.usage import AccountUsage
from schemas.ratelimit_fields import (
    MINUTE_POLICY,
    POLICY_HEADER,
    STATE_HEADER,
    STREAMS_POLICY,
    plan_fields,
    seconds_until,
)
from schemas.ratelimit_fields import sf_list as _sf_list

__all__ = [
    "API_POLICY",
    "MINUTE_POLICY",
    "POLICY_HEADER",
    "STATE_HEADER",
    "STREAMS_POLICY",
    "PlanLimits",
    "api_limit_headers",
    "plan_headers",
    "plan_limits",
    "seconds_until",
]

API_POLICY = "api"
"""The API's own limit (a token bucket per API key, or per client address without a
valid key): q = its burst, w = the seconds an empty bucket takes to refill."""


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """The plan's limits at one instant, for one account. Invariants: 0 <= remaining
    <= per_minute, 0 <= streams_remaining <= max_streams, reset_epoch is the end of
    the minute holding now and 0 < reset_in <= 60."""

    per_minute: int
    remaining: int
    """per_minute minus the requests rolled up for the current minute, at least 0."""
    resets_at: datetime
    """The next minute boundary: when `remaining` is per_minute again."""
    reset_epoch: int
    reset_in: int
    """Seconds from now to `reset_epoch`, rounded up (§7's `t`)."""
    max_streams: int
    active_streams: int
    streams_remaining: int
    """max_streams minus the active streams, at least 0."""


def plan_limits(plan: Plan, usage: AccountUsage, active_streams: int, now: datetime) -> PlanLimits:
    reset_epoch = int(usage.minute.end.timestamp())
    return PlanLimits(
        per_minute=plan.per_minute,
        remaining=max(0, plan.per_minute - usage.this_minute),
        resets_at=usage.minute.end,
        reset_epoch=reset_epoch,
        reset_in=seconds_until(reset_epoch, now.timestamp()),
        max_streams=plan.max_streams,
        active_streams=active_streams,
        streams_remaining=max(0, plan.max_streams - active_streams),
    )


def plan_headers(limits: PlanLimits) -> dict[str, str]:
    """X-RateLimit-* and the RateLimit fields of a usage answer (docs/api.md#usage)."""
    return plan_fields(
        per_minute=limits.per_minute,
        remaining=limits.remaining,
        reset_epoch=limits.reset_epoch,
        reset_in=limits.reset_in,
        max_streams=limits.max_streams,
        streams_remaining=limits.streams_remaining,
    )


@lru_cache(maxsize=64)
def _api_policy(limit: int, window: int) -> str:
    # Every 429 of a flood carries these: cached, as the plan's are (~13 µs each).
    return _sf_list([(API_POLICY, {"q": limit, "w": window})])


@lru_cache(maxsize=1024)
def _api_state(remaining: int, reset_in: int) -> str:
    return _sf_list([(API_POLICY, {"r": remaining, "t": reset_in})])


def api_limit_headers(decision: Decision, now_epoch: float) -> dict[str, str]:
    """X-RateLimit-* and the §7 fields of a 429 from the API's own limit: they describe
    the bucket that refused the request (its burst, what is left, when it is full)."""
    # Rounded up: at that second the whole burst is available again.
    reset_epoch = math.ceil(now_epoch + decision.reset_after)
    remaining = max(0, decision.remaining)
    window = max(1, math.ceil(decision.refill_s))
    policy = _api_policy(decision.limit, window)
    state = _api_state(remaining, seconds_until(reset_epoch, now_epoch))
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset_epoch),
        POLICY_HEADER: policy,
        STATE_HEADER: state,
    }
