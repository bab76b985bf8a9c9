"""The §7 rate-limit fields (draft-ietf-httpapi-ratelimit-headers) as RFC 9651 Lists.

Shared by the usage API (query_api/limits.py) and the gateway middleware's enforcement
(producers/enforcement.py): both describe an account's plan with the same two policies,
so a 429 from a gateway and a usage answer read alike, byte for byte:

    RateLimit-Policy: "minute";q=300;w=60, "streams";q=10;qu="concurrent-requests"
    RateLimit: "minute";r=287;t=13, "streams";r=8

Serialized with http-sf (a maintained RFC 9651 implementation); the texts are cached
because few distinct values occur and each serialization costs ~10 µs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

import http_sf
from http_sf.types import ListType, ParamsType

MINUTE_POLICY: Final = "minute"
STREAMS_POLICY: Final = "streams"
POLICY_HEADER: Final = "RateLimit-Policy"
STATE_HEADER: Final = "RateLimit"


def seconds_until(reset_epoch: int, now_epoch: float) -> int:
    """`t` for a reset at `reset_epoch`: whole seconds from now, rounded up, never < 0."""
    return max(0, math.ceil(reset_epoch - now_epoch))


def sf_list(members: Sequence[tuple[str, ParamsType]]) -> str:
    """An RFC 9651 List of sf-string policy names, each with its parameters."""
    items: ListType = [(name, params) for name, params in members]
    return http_sf.ser(items)


@lru_cache(maxsize=64)
def plan_policy(per_minute: int, max_streams: int) -> str:
    """`RateLimit-Policy` of a plan: one text per plan."""
    return sf_list(
        [
            (MINUTE_POLICY, {"q": per_minute, "w": 60}),
            (STREAMS_POLICY, {"q": max_streams, "qu": "concurrent-requests"}),
        ]
    )


@lru_cache(maxsize=4096)
def plan_state(remaining: int, reset_in: int, streams_remaining: int) -> str:
    """`RateLimit` of a plan's state: few distinct values (remaining x 60 s x streams)."""
    return sf_list(
        [
            (MINUTE_POLICY, {"r": remaining, "t": reset_in}),
            (STREAMS_POLICY, {"r": streams_remaining}),
        ]
    )


def plan_fields(
    *,
    per_minute: int,
    remaining: int,
    reset_epoch: int,
    reset_in: int,
    max_streams: int,
    streams_remaining: int,
) -> dict[str, str]:
    """X-RateLimit-* and the §7 fields of a plan's state; every number once, so they agree."""
    return {
        "X-RateLimit-Limit": str(per_minute),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset_epoch),
        POLICY_HEADER: plan_policy(per_minute, max_streams),
        STATE_HEADER: plan_state(remaining, reset_in, streams_remaining),
    }
