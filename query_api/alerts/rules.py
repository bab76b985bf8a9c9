"""Which alerts an account's usage calls for (pure; docs/alerts.md).

An alert's identity is (type, account, window, window start, threshold): at most
one alert ever exists per identity, and `alert_id` derives its id from it alone,
so every evaluator that finds the same crossing names it the same way. Windows
are placed and percentages computed exactly as the usage endpoints do
(query_api/usage.py, schemas/windows.py), so an alert at 80 means the usage
endpoint showed at least 80.0 for that window.

Late events: a window is evaluated while it runs and for `late` after it ends
(TALLY_ALERTS_LATE_S). A late event that pushes a window over a threshold within
that grace raises the alert for that window (its `window_start` says which); after
it, the window is left alone: it has reset, and an alert about it would warn of
nothing. The same grace bounds how long a stopped evaluator may stay down
without missing a crossing.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from query_api.alerts.forecast import Forecast, forecast
from query_api.plans import Plan
from query_api.queries import MinuteRow
from query_api.usage import WEEK
from schemas.windows import (
    Window,
    chain_start,
    first_request_windows,
    fixed_window,
    format_time,
    used_percentage,
    week_window,
)

CROSSED = "usage.threshold.crossed"
PROJECTED = "usage.threshold.projected"
TEST = "webhook.test"
EVENT_TYPES = (CROSSED, PROJECTED)

WindowName = Literal["session", "weekly"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: its identity and what it says."""

    type: str
    account: str
    plan: str
    window: WindowName
    threshold: int
    used_percentage: float
    start: datetime
    resets_at: datetime

    @property
    def id(self) -> str:
        return alert_id(self.type, self.account, self.window, self.start, self.threshold)

    def data(self) -> dict[str, object]:
        return {
            "account": self.account,
            "plan": self.plan,
            "window": self.window,
            "threshold": self.threshold,
            "used_percentage": self.used_percentage,
            "window_start": format_time(self.start),
            "resets_at": format_time(self.resets_at),
        }


def alert_id(type_: str, account: str, window: str, start: datetime, threshold: int) -> str:
    """`alrt_` + 32 hex digits of SHA-256 over the identity: stable across processes."""
    key = f"{type_}\n{account}\n{window}\n{format_time(start)}\n{threshold}"
    return "alrt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def event_body(alert: Alert, emitted_at: datetime) -> dict[str, object]:
    """The event as the webhook body and the `tally.alerts` value carry it."""
    return {"type": alert.type, "timestamp": format_time(emitted_at), "data": alert.data()}


def windows(
    rows: Sequence[MinuteRow], plan: Plan, now: datetime, late: timedelta
) -> Iterator[tuple[WindowName, float, Window]]:
    """(name, limit, window) for every session and weekly window that started by
    `now` and ended after `now - late`: the windows still open to alerts."""
    activity = [minute for minute, requests, _ in rows if requests > 0 and minute <= now]
    since = now - late
    session_length = timedelta(minutes=plan.session_minutes)
    kinds: tuple[tuple[WindowName, float, str, timedelta], ...] = (
        ("session", plan.session_limit, plan.session_anchor, session_length),
        ("weekly", plan.weekly_limit, plan.weekly_anchor, WEEK),
    )
    for name, limit, anchor, length in kinds:
        if anchor == "first_request":
            placed = first_request_windows(activity[chain_start(activity, length) :], length)
        elif name == "session":
            placed = _fixed(lambda t, n=length: fixed_window(t, n), since, now)  # type: ignore[misc]
        else:
            placed = _fixed(week_window, since, now)
        for window in placed:
            if window.end > since and window.start <= now:
                yield name, limit, window


def _fixed(place: Callable[[datetime], Window], since: datetime, now: datetime) -> list[Window]:
    found: list[Window] = [place(since)]
    while found[-1].end <= now:
        found.append(place(found[-1].end))
    return found


def units_in(rows: Sequence[MinuteRow], window: Window) -> int:
    return sum(units for minute, _, units in rows if window.start <= minute < window.end)


def due(
    account: str, rows: Sequence[MinuteRow], plan: Plan, now: datetime, late: timedelta
) -> list[Alert]:
    """Every alert the usage in `rows` calls for at `now` (emitted or not yet).

    Crossed: each threshold the window's used_percentage has reached. Projected:
    once per running window, when the forecast (query_api/alerts/forecast.py)
    reaches 100 % before the window resets and the usage itself has not yet.
    """
    found: list[Alert] = []
    placed = list(windows(rows, plan, now, late))
    if not placed:
        return found
    # Only the rows from the earliest open window on are summed (rows are ascending).
    rows = rows[bisect_left(rows, (min(w.start for _, _, w in placed),)) :]
    for name, limit, window in placed:
        pct = used_percentage(units_in(rows, window), limit)
        for threshold in plan.alert_thresholds:
            if pct >= threshold:
                found.append(
                    Alert(
                        CROSSED, account, plan.name, name, threshold, pct, window.start, window.end
                    )
                )
        if window.contains(now) and pct < 100:
            ahead: Forecast = forecast(rows, window, limit, now)
            if ahead.exhausted_at is not None:
                found.append(
                    Alert(PROJECTED, account, plan.name, name, 100, pct, window.start, window.end)
                )
    return found
