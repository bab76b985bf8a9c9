"""Usage windows: which span of time a limit or a counter covers (pure, no clock).

`now` is always a parameter, so the API, the processors and the tests agree on one
instant per request. Every datetime must be timezone-aware (naive ones raise
ValueError: guessing their zone is how off-by-hours bugs start); aware datetimes in
another zone are converted, and every returned datetime is in UTC. Windows are
half-open, [start, end), so adjacent windows never share an instant.

Fixed windows (docs/api.md#windows): the minute, the UTC day, the week from Monday 00:00
UTC, epoch-aligned blocks (`session_anchor=fixed`), and the monthly billing period.

First-request windows (`session_anchor=first_request`, `weekly_anchor=first_request`)
depend on when the account was active, known per minute from the rollups. The rule:

    The first window starts at the first activity minute. Each later window starts
    at the first activity minute at or after the end of the previous window. Every
    window lasts `length`.

So "a session starts at the minute of the first request after the previous one
ended": windows are minute-aligned, never overlap, and a minute with no window
around it means no active session (the API reports 0.0 and `resets_at: null`).
A window is fixed once its first minute is known, so activity after `now` (gateway
clocks may run up to 5 minutes ahead) cannot change the window containing `now`.
"""

from __future__ import annotations

import calendar
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


def _utc(t: datetime, name: str = "datetime") -> datetime:
    if t.tzinfo is UTC:  # the common case, and astimezone(UTC) would return t itself
        return t
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {t.isoformat()}")
    return t.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Window:
    """The half-open span [start, end)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if _utc(self.start, "start") >= _utc(self.end, "end"):
            raise ValueError(f"empty window: {self.start} >= {self.end}")

    def contains(self, t: datetime) -> bool:
        return self.start <= _utc(t) < self.end


def minute_window(now: datetime) -> Window:
    start = _utc(now, "now").replace(second=0, microsecond=0)
    return Window(start, start + MINUTE)


def day_window(now: datetime) -> Window:
    start = _utc(now, "now").replace(hour=0, minute=0, second=0, microsecond=0)
    return Window(start, start + DAY)


def week_window(now: datetime) -> Window:
    day = day_window(now).start
    start = day - day.weekday() * DAY  # weekday() is 0 on Monday
    return Window(start, start + 7 * DAY)


def fixed_window(now: datetime, length: timedelta) -> Window:
    """The block of `length` containing `now`, blocks counted from the Unix epoch.

    Anchoring at the epoch rather than at midnight keeps blocks contiguous when
    `length` does not divide a day (5-hour sessions cross midnight).
    """
    start = floor_to(now, length)
    return Window(start, start + length)


def floor_to(t: datetime, step: timedelta) -> datetime:
    """The start of the `step` block containing `t`, blocks counted from the Unix epoch."""
    if step <= timedelta(0):
        raise ValueError(f"step must be positive, got {step}")
    # timedelta // timedelta is exact integer floor division, also before the epoch.
    return EPOCH + (_utc(t, "time") - EPOCH) // step * step


def ceil_to(t: datetime, step: timedelta) -> datetime:
    """The first epoch-aligned `step` boundary at or after `t`."""
    start = floor_to(t, step)
    return start if start == t else start + step


def minute_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The minutes whose start lies in [start, end), as [first, stop) (both UTC).

    Rollups are per minute and a minute cannot be split, so every range over them
    (analytics, admin totals, `tally reconcile`) keeps exactly these minutes:
    `from=10:00:30Z` begins with the 10:01 minute. Empty (first >= stop) when no
    minute starts inside the range. Naive bounds raise ValueError.
    """
    return ceil_to(start, MINUTE), ceil_to(end, MINUTE)


def _period_start(year: int, month: int, anchor_day: int) -> datetime:
    # Short months clamp to their last day, so every month has exactly one start.
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _shift_month(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


def billing_period(now: datetime, anchor_day: int = 1) -> Window:
    """The monthly billing period containing `now`.

    A period starts at 00:00 UTC on `anchor_day` (1..31) of a month, or on the
    month's last day when the month is shorter (anchor 31: Feb 28/29, Apr 30), and
    ends where the next month's period starts. `anchor_day=1` is the calendar month.
    """
    if not 1 <= anchor_day <= 31:
        raise ValueError(f"anchor_day must be in 1..31, got {anchor_day}")
    now = _utc(now, "now")
    start = _period_start(now.year, now.month, anchor_day)
    if now < start:
        start = _period_start(*_shift_month(now.year, now.month, -1), anchor_day)
    end = _period_start(*_shift_month(start.year, start.month, 1), anchor_day)
    return Window(start, end)


def _check_length(length: timedelta) -> None:
    # Activity is only known per minute, so a window must end on a minute boundary
    # for "the first activity minute at or after the end" to be well defined.
    if length <= timedelta(0) or length % MINUTE:
        raise ValueError(f"length must be a positive whole number of minutes, got {length}")


def _minutes(activity: Sequence[datetime]) -> list[datetime]:
    minutes = [_utc(t, "activity minute") for t in activity]
    for i, t in enumerate(minutes):
        if t.second or t.microsecond:
            raise ValueError(f"activity must be floored to the minute, got {t.isoformat()}")
        if i and t <= minutes[i - 1]:
            raise ValueError(f"activity must be ascending and distinct, got {t.isoformat()}")
    return minutes


def _windows(minutes: list[datetime], length: timedelta) -> list[Window]:
    windows: list[Window] = []
    for t in minutes:
        if not windows or t >= windows[-1].end:
            windows.append(Window(t, t + length))
    return windows


def _chain_start(minutes: list[datetime], length: timedelta) -> int:
    # Any window containing minutes[i-1] started at or before it, so it ended at or
    # before minutes[i-1] + length <= minutes[i]: minutes[i] therefore starts a
    # window whatever came earlier, and the chain from there on is the same when
    # computed from minutes[i:]. The last such i bounds how much history to read.
    for i in range(len(minutes) - 1, 0, -1):
        if minutes[i] - minutes[i - 1] >= length:
            return i
    return 0


def first_request_windows(activity: Sequence[datetime], length: timedelta) -> list[Window]:
    """All first-request windows over `activity` (minutes, ascending, distinct): the
    alert rules place every window a late event may have pushed over a threshold."""
    _check_length(length)
    return _windows(_minutes(activity), length)


def chain_start(activity: Sequence[datetime], length: timedelta) -> int:
    """An index i such that the windows over activity[i:] are the last windows over
    all of `activity`: the last i with activity[i] - activity[i-1] >= length, or 0.

    To find the window containing `now`, pass only activity at or before `now`:
    a gap after `now` would otherwise cut off the current window.
    """
    _check_length(length)
    return _chain_start(_minutes(activity), length)


def current_first_request_window(
    activity: Sequence[datetime], length: timedelta, now: datetime
) -> Window | None:
    """The first-request window containing `now`, or None when no window is active."""
    _check_length(length)
    now = _utc(now, "now")
    # A window depends only on activity up to its start, so activity after `now`
    # (gateway clock ahead) cannot change the current window; dropping it also
    # keeps a gap that lies in the future from cutting the chain after `now`.
    minutes = _minutes(activity)
    minutes = minutes[: bisect_right(minutes, now)]
    windows = _windows(minutes[_chain_start(minutes, length) :], length)
    # Windows are disjoint and ascending and all start by `now`: only the last can
    # contain it.
    if windows and now < windows[-1].end:
        return windows[-1]
    return None


def used_percentage(used_micro: int, limit_units: float) -> float:
    """100 x used / limit, rounded half-up to one decimal; may exceed 100.

    `used_micro` is in millionths of a unit, as the rollups store it. The rounding
    is exact: the ratio stays in integers and only the final tenths become a float,
    so 0.15 % shows 0.2 where float arithmetic and round() give 0.1. (Decimal
    division would round to 28 digits before the half-up step: a double rounding.)
    A limit <= 0 allows nothing: no usage is 0.0 and any usage is 100.0 (the whole
    allowance, and a number JSON can carry, unlike infinity).
    """
    if used_micro < 0:
        raise ValueError(f"used_micro must be >= 0, got {used_micro}")
    if not math.isfinite(limit_units):
        raise ValueError(f"limit_units must be finite, got {limit_units}")
    if limit_units <= 0:
        return 0.0 if used_micro == 0 else 100.0
    # tenths of a percent = 1000 * (used_micro / 1e6) / limit = used_micro * q / (1000 * p)
    p, q = limit_units.as_integer_ratio()
    num, den = used_micro * q, 1000 * p
    tenths = (2 * num + den) // (2 * den)  # floor(x + 1/2): half-up for x >= 0
    return tenths / 10


_MICROSECOND = timedelta(microseconds=1)


def epoch_micros(at: datetime) -> int:
    """Microseconds since the epoch, exactly (a float timestamp is not exact)."""
    return (at - EPOCH) // _MICROSECOND


def format_time(t: datetime) -> str:
    """UTC RFC 3339 with milliseconds and Z, e.g. 2026-03-29T03:00:00.000Z.

    Sub-millisecond digits are truncated, not rounded, so a formatted boundary
    never moves past the instant it stands for.
    """
    return _utc(t).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def period_end_inclusive(w: Window) -> datetime:
    """The last second of `w` (docs/api.md#get-apiv1accountusage: `period.end`)."""
    return _utc(w.end) - timedelta(seconds=1)
