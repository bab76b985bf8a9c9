"""`compute` (query_api/usage.py) against a reference built window by window.

compute sums every total in one pass and reuses the calendar windows of a minute
and the billing period of a day across requests; the reference places each window
from `now` with schemas/windows.py and sums each separately, as compute once did.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from query_api.plans import DEFAULT_PLANS, Plan
from query_api.queries import MinuteRow
from query_api.usage import WEEK, AccountUsage, WindowUse, _first_request, compute
from schemas.windows import (
    Window,
    billing_period,
    day_window,
    fixed_window,
    minute_window,
    week_window,
)

PLANS = [
    *DEFAULT_PLANS.values(),
    Plan(
        name="fixed-both",
        session_hours=0.5,
        session_limit=10,
        session_anchor="fixed",
        weekly_limit=100,
        weekly_anchor="first_request",
        per_minute=5,
        max_streams=0,
    ),
]


def reference(rows: list[MinuteRow], plan: Plan, anchor_day: int, now: datetime) -> AccountUsage:
    activity = [minute for minute, requests, _ in rows if requests > 0]
    length = timedelta(minutes=plan.session_minutes)
    session = (
        fixed_window(now, length)
        if plan.session_anchor == "fixed"
        else _first_request(activity, length, now)
    )
    weekly = (
        week_window(now) if plan.weekly_anchor == "fixed" else _first_request(activity, WEEK, now)
    )

    def units(window: Window | None) -> int:
        if window is None:
            return 0
        return sum(u for minute, _, u in rows if window.start <= minute < window.end)

    def requests(window: Window) -> int:
        return sum(r for minute, r, _ in rows if window.start <= minute < window.end)

    return AccountUsage(
        session=WindowUse(session, units(session)),
        weekly=WindowUse(weekly, units(weekly)),
        today=requests(day_window(now)),
        this_week=requests(week_window(now)),
        this_month=requests(billing_period(now, anchor_day)),
        this_minute=requests(minute_window(now)),
        minute=minute_window(now),
        period=billing_period(now, anchor_day),
    )


def history(rng: random.Random, now: datetime) -> list[MinuteRow]:
    """Ascending distinct minutes around `now` (some ahead of it), bursts and gaps."""
    floor = now.astimezone(UTC).replace(second=0, microsecond=0)
    backs = sorted(
        {rng.choice([rng.randrange(-5, 6), rng.randrange(60 * 24 * 40)]) for _ in range(30)},
        reverse=True,
    )
    return [
        (floor - timedelta(minutes=back), rng.choice([0, 1, 7]), rng.randrange(0, 5_000_000))
        for back in backs
    ]


@pytest.mark.parametrize("seed", range(40))
def test_compute_equals_the_window_by_window_reference(seed: int) -> None:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for _ in range(25):
        now = start + timedelta(
            seconds=rng.randrange(3 * 365 * 86_400), microseconds=rng.randrange(10**6)
        )
        if rng.random() < 0.2:  # an aware time that is not in UTC takes the uncached path
            now = now.astimezone(timezone(timedelta(hours=rng.choice([-7, 5, 13]))))
        rows = history(rng, now)
        plan = rng.choice(PLANS)
        anchor = rng.randint(1, 31)
        assert compute(rows, plan, anchor, now) == reference(rows, plan, anchor, now)


def test_no_rows_no_usage_and_windows_still_placed() -> None:
    now = datetime(2026, 3, 29, 12, 0, 30, tzinfo=UTC)
    found = compute([], DEFAULT_PLANS["free"], 31, now)
    assert found == reference([], DEFAULT_PLANS["free"], 31, now)
    assert found.session == WindowUse(None, 0)
    assert found.period == Window(
        datetime(2026, 3, 31, tzinfo=UTC) - timedelta(days=31), datetime(2026, 3, 31, tzinfo=UTC)
    )
