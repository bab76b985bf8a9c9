"""An account's usage at an instant, from its per-minute rollups (pure).

Both usage endpoints are views of `AccountUsage`. Every window is minute-aligned
(schemas/windows.py), so summing whole minutes gives exact window totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from query_api.plans import Plan
from query_api.queries import MinuteRow
from schemas.windows import (
    Window,
    billing_period,
    chain_start,
    current_first_request_window,
    day_window,
    fixed_window,
    minute_window,
    week_window,
)

WEEK = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class WindowUse:
    window: Window | None
    """None: first_request anchoring with no window running now."""
    used_micro: int


@dataclass(frozen=True, slots=True)
class AccountUsage:
    session: WindowUse
    weekly: WindowUse
    today: int
    this_week: int
    this_month: int
    this_minute: int
    minute: Window
    period: Window


def history_start(now: datetime, history: timedelta, anchor_day: int) -> datetime:
    """How far back the rollups must be read to answer for `now`."""
    return min(now - history, billing_period(now, anchor_day).start)


def history_start_any_anchor(now: datetime, history: timedelta) -> datetime:
    """`history_start` for whichever billing anchor the account has: the earliest.

    Lets the account and its rollups be read in one statement, before the anchor
    is known. Reading further back changes no answer: windows are placed from the
    newest certain boundary, and totals only sum minutes inside their window.
    """
    return min(now - history, _earliest_period_start(now.astimezone(UTC).date()))


@lru_cache(maxsize=64)
def _earliest_period_start(day: date) -> datetime:
    """The earliest start, over every anchor, of the billing period holding `day`.

    Periods start at 00:00 UTC, so any instant of a day is in the same periods as the
    day's midnight; cached because each usage request would otherwise place 31 periods.
    """
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return min(billing_period(midnight, anchor).start for anchor in range(1, 32))


@lru_cache(maxsize=16)
def _calendar(minute: datetime) -> tuple[Window, Window, Window]:
    """The (minute, day, week) windows holding a UTC minute: the same for every
    instant in it, so requests within a minute share them rather than place them."""
    return minute_window(minute), day_window(minute), week_window(minute)


@lru_cache(maxsize=256)
def _billing_period(day: date, anchor_day: int) -> Window:
    """`billing_period` of any instant of a UTC day (periods start at 00:00 UTC)."""
    return billing_period(datetime(day.year, day.month, day.day, tzinfo=UTC), anchor_day)


def compute(rows: Sequence[MinuteRow], plan: Plan, anchor_day: int, now: datetime) -> AccountUsage:
    activity = [minute for minute, requests, _ in rows if requests > 0]
    session = _window(plan.session_anchor, timedelta(minutes=plan.session_minutes), activity, now)
    if now.tzinfo is UTC:
        minute, day, week = _calendar(now.replace(second=0, microsecond=0))
        period = _billing_period(now.date(), anchor_day)
    else:
        minute, day, week = minute_window(now), day_window(now), week_window(now)
        period = billing_period(now, anchor_day)
    weekly = week if plan.weekly_anchor == "fixed" else _first_request(activity, WEEK, now)
    # Every total in one pass over the rows (each usage answer sums six windows).
    d0, d1, w0, w1, p0, p1, m0, m1 = (
        day.start, day.end, week.start, week.end, period.start, period.end,
        minute.start, minute.end,
    )  # fmt: skip
    # A window that is None sums nothing: an empty span.
    s0, s1 = (session.start, session.end) if session else (now, now)
    k0, k1 = (weekly.start, weekly.end) if weekly else (now, now)
    today = this_week = this_month = this_minute = session_units = weekly_units = 0
    for at, requests, units in rows:
        if d0 <= at < d1:
            today += requests
        if w0 <= at < w1:
            this_week += requests
        if p0 <= at < p1:
            this_month += requests
        if m0 <= at < m1:
            this_minute += requests
        if s0 <= at < s1:
            session_units += units
        if k0 <= at < k1:
            weekly_units += units
    return AccountUsage(
        session=WindowUse(session, session_units),
        weekly=WindowUse(weekly, weekly_units),
        today=today,
        this_week=this_week,
        this_month=this_month,
        this_minute=this_minute,
        minute=minute,
        period=period,
    )


def _window(
    anchor: str, length: timedelta, activity: list[datetime], now: datetime
) -> Window | None:
    if anchor == "fixed":
        return fixed_window(now, length)
    return _first_request(activity, length, now)


def _first_request(activity: list[datetime], length: timedelta, now: datetime) -> Window | None:
    # Only history up to now places the current window; a gap found among
    # minutes ahead of the clock would cut off the running session.
    past = [minute for minute in activity if minute <= now]
    # The read history may begin mid-chain; a gap of `length` inside it is a
    # certain window boundary, so the chain is exact from there on.
    return current_first_request_window(past[chain_start(past, length) :], length, now)
