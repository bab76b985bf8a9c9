"""Where a window is heading: usage projected at its reset, and when it runs out (pure).

The rate is the window's own usage over its last hour (RATE_SPAN): the minutes
from max(window start, the minute an hour before now's) up to now's minute,
divided by the time they span (at least a minute). Why this rate: an hour follows
a change of pace within the hour while, once the window is an hour old, one busy
minute does not swing it (earlier, the window's first minutes set the pace); and only
the running window counts, because usage before a reset says nothing about the
window after it (a first_request session starts with the traffic itself). The
projection assumes that rate holds until the window resets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from query_api.queries import MinuteRow
from schemas.windows import MINUTE, Window, used_percentage

RATE_SPAN = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Forecast:
    used_micro: int
    rate_micro_per_s: float
    """Units (in millionths) per second over the rate span."""
    projected_percentage: float
    """Used percentage projected at the window's end, rounded as used_percentage is."""
    exhausted_at: datetime | None
    """When 100 % is reached at that rate (now, when it is reached already); None
    when not before the window resets."""


def forecast(rows: Sequence[MinuteRow], window: Window, limit: float, now: datetime) -> Forecast:
    """The forecast of `window` (which contains `now`) from the account's minute rows."""
    used = sum(u for minute, _, u in rows if window.start <= minute < window.end)
    this_minute = now.replace(second=0, microsecond=0)
    rate_start = max(window.start, this_minute - RATE_SPAN + MINUTE)
    recent = sum(u for minute, _, u in rows if rate_start <= minute <= this_minute)
    elapsed = max((now - rate_start).total_seconds(), MINUTE.total_seconds())
    rate = recent / elapsed
    remaining = max((window.end - now).total_seconds(), 0.0)
    projected = used_percentage(round(used + rate * remaining), limit)
    exhausted: datetime | None = None
    if used_percentage(used, limit) >= 100:
        exhausted = now
    elif rate > 0:
        at = now + timedelta(seconds=(limit * 1_000_000 - used) / rate)
        exhausted = at if at < window.end else None
    return Forecast(used, rate, projected, exhausted)
