from __future__ import annotations

import calendar
import math
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.windows import (
    EPOCH,
    Window,
    billing_period,
    chain_start,
    current_first_request_window,
    day_window,
    epoch_micros,
    fixed_window,
    format_time,
    minute_window,
    period_end_inclusive,
    used_percentage,
    week_window,
)

MINUTE = timedelta(minutes=1)
HOURS_5 = timedelta(hours=5)
FAST = settings(max_examples=150, deadline=None)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def win(start: datetime, end: datetime) -> Window:
    return Window(start, end)


# --- brute-force references -------------------------------------------------------


def brute_first_request_windows(activity: Sequence[datetime], length: timedelta) -> list[Window]:
    """Walk minute by minute; a minute with activity at or after the end starts a window."""
    if not activity:
        return []
    active = set(activity)
    windows: list[Window] = []
    end: datetime | None = None
    t = activity[0]
    while t <= activity[-1]:
        if t in active and (end is None or t >= end):
            end = t + length
            windows.append(Window(t, end))
        t += MINUTE
    return windows


def brute_current(activity: Sequence[datetime], length: timedelta, now: datetime) -> Window | None:
    hits = [w for w in brute_first_request_windows(activity, length) if w.start <= now < w.end]
    assert len(hits) <= 1
    return hits[0] if hits else None


def is_period_start(d: date, anchor_day: int) -> bool:
    return d.day == min(anchor_day, calendar.monthrange(d.year, d.month)[1])


def brute_billing_period(now: datetime, anchor_day: int) -> Window:
    """Step day by day back to the last period start and forward to the next one."""
    start = now.date()
    while not is_period_start(start, anchor_day):
        start -= timedelta(days=1)
    end = start + timedelta(days=1)
    while not is_period_start(end, anchor_day):
        end += timedelta(days=1)
    return Window(datetime.combine(start, time(), UTC), datetime.combine(end, time(), UTC))


def brute_percentage(used_micro: int, limit_units: float) -> float:
    tenths = Fraction(used_micro, 10**6) * 100 / Fraction(limit_units) * 10
    k = math.floor(tenths)
    if tenths - k >= Fraction(1, 2):
        k += 1
    return float(Fraction(k, 10))


# --- strategies -----------------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2100, 12, 31, 23, 59, 59, 999999)
).map(lambda t: t.replace(tzinfo=UTC))
minute_starts = instants.map(lambda t: t.replace(second=0, microsecond=0))
offsets = st.lists(st.integers(0, 3000), max_size=60, unique=True).map(sorted)
lengths = st.integers(1, 600).map(lambda m: timedelta(minutes=m))


def activity_from(base: datetime, minutes: list[int]) -> list[datetime]:
    return [base + m * MINUTE for m in minutes]


# --- Window ---------------------------------------------------------------------------


def test_window_is_half_open() -> None:
    w = win(utc(2026, 3, 29, 10), utc(2026, 3, 29, 11))
    assert w.contains(utc(2026, 3, 29, 10))
    assert w.contains(utc(2026, 3, 29, 10, 59, 59, 999999))
    assert not w.contains(utc(2026, 3, 29, 11))
    assert not w.contains(utc(2026, 3, 29, 9, 59, 59, 999999))
    assert w.contains(datetime(2026, 3, 29, 12, 30, tzinfo=timezone(timedelta(hours=2))))


def test_window_rejects_naive_and_empty() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Window(datetime(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(ValueError, match="empty window"):
        win(utc(2026, 1, 1), utc(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        win(utc(2026, 1, 1), utc(2026, 1, 2)).contains(datetime(2026, 1, 1, 12))


# --- minute, day, week ----------------------------------------------------------------


def test_minute_window_resets_at_the_next_minute_boundary() -> None:
    w = minute_window(utc(2026, 2, 8, 14, 44, 59, 500000))
    assert w == win(utc(2026, 2, 8, 14, 44), utc(2026, 2, 8, 14, 45))
    assert format_time(w.end) == "2026-02-08T14:45:00.000Z"
    assert minute_window(utc(2026, 2, 8, 14, 45)).start == utc(2026, 2, 8, 14, 45)
    assert minute_window(utc(2025, 12, 31, 23, 59, 30)).end == utc(2026, 1, 1)


def test_day_window_is_the_utc_day() -> None:
    assert day_window(utc(2024, 2, 28, 23, 59, 59, 999999)) == win(
        utc(2024, 2, 28), utc(2024, 2, 29)
    )
    assert day_window(utc(2024, 2, 29, 0)) == win(utc(2024, 2, 29), utc(2024, 3, 1))
    assert day_window(utc(2025, 12, 31, 12)) == win(utc(2025, 12, 31), utc(2026, 1, 1))
    # 01:00 at +02:00 is still the previous UTC day.
    plus_two = timezone(timedelta(hours=2))
    assert day_window(datetime(2026, 3, 30, 1, tzinfo=plus_two)).start == utc(2026, 3, 29)


def test_week_window_starts_monday_utc() -> None:
    sunday_last_instant = utc(2026, 3, 29, 23, 59, 59, 999999)
    assert week_window(sunday_last_instant) == win(utc(2026, 3, 23), utc(2026, 3, 30))
    assert week_window(utc(2026, 3, 30)) == win(utc(2026, 3, 30), utc(2026, 4, 6))
    assert week_window(utc(2026, 1, 1, 8)) == win(utc(2025, 12, 29), utc(2026, 1, 5))
    assert week_window(EPOCH) == win(utc(1969, 12, 29), utc(1970, 1, 5))  # a Thursday


@FAST
@given(instants)
def test_calendar_windows_contain_now_and_are_aligned(now: datetime) -> None:
    m, d, w = minute_window(now), day_window(now), week_window(now)
    for window, length in ((m, MINUTE), (d, timedelta(days=1)), (w, timedelta(days=7))):
        assert window.contains(now)
        assert window.end - window.start == length
        assert window.start.tzinfo is UTC
    assert (m.start.second, m.start.microsecond) == (0, 0)
    assert d.start.time() == time()
    assert d.start.date() == now.date()
    assert w.start.time() == time()
    assert w.start.weekday() == 0


# --- fixed windows ----------------------------------------------------------------


def test_fixed_five_hour_sessions_cross_midnight() -> None:
    # 24 is not a multiple of 5: epoch-aligned blocks drift across days.
    assert fixed_window(utc(2026, 3, 28, 23), HOURS_5) == win(
        utc(2026, 3, 28, 20), utc(2026, 3, 29, 1)
    )
    assert fixed_window(utc(2026, 3, 29, 1), HOURS_5) == win(
        utc(2026, 3, 29, 1), utc(2026, 3, 29, 6)
    )
    assert fixed_window(utc(2026, 3, 30, 23), HOURS_5) == win(
        utc(2026, 3, 30, 22), utc(2026, 3, 31, 3)
    )
    assert fixed_window(EPOCH, HOURS_5) == win(EPOCH, utc(1970, 1, 1, 5))
    assert fixed_window(utc(1969, 12, 31, 23), HOURS_5) == win(utc(1969, 12, 31, 19), EPOCH)


def test_fixed_window_needs_a_positive_length() -> None:
    with pytest.raises(ValueError, match="positive"):
        fixed_window(EPOCH, timedelta(0))
    with pytest.raises(ValueError, match="positive"):
        fixed_window(EPOCH, -HOURS_5)


@FAST
@given(instants, st.integers(1, 10**6).map(lambda s: timedelta(seconds=s)))
def test_fixed_window_is_the_epoch_aligned_block_containing_now(
    now: datetime, length: timedelta
) -> None:
    w = fixed_window(now, length)
    assert w.contains(now)
    assert w.end - w.start == length
    assert (w.start - EPOCH) % length == timedelta(0)


# --- billing period ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "anchor", "start", "end"),
    [
        # calendar month, month and year boundaries
        (utc(2026, 2, 8, 14, 50), 1, utc(2026, 2, 1), utc(2026, 3, 1)),
        (utc(2025, 12, 31, 23, 59, 59, 999999), 1, utc(2025, 12, 1), utc(2026, 1, 1)),
        (utc(2026, 1, 1), 1, utc(2026, 1, 1), utc(2026, 2, 1)),
        (utc(2026, 1, 10), 15, utc(2025, 12, 15), utc(2026, 1, 15)),
        # anchor 31: short months start on their last day
        (utc(2026, 2, 15), 31, utc(2026, 1, 31), utc(2026, 2, 28)),
        (utc(2026, 2, 28), 31, utc(2026, 2, 28), utc(2026, 3, 31)),
        (utc(2026, 4, 29, 23), 31, utc(2026, 3, 31), utc(2026, 4, 30)),
        (utc(2026, 4, 30), 31, utc(2026, 4, 30), utc(2026, 5, 31)),
        (utc(2024, 2, 28, 23, 59), 31, utc(2024, 1, 31), utc(2024, 2, 29)),
        (utc(2024, 2, 29, 12), 31, utc(2024, 2, 29), utc(2024, 3, 31)),
        # anchor 30
        (utc(2024, 2, 29), 30, utc(2024, 2, 29), utc(2024, 3, 30)),
        (utc(2025, 2, 28), 30, utc(2025, 2, 28), utc(2025, 3, 30)),
        (utc(2025, 3, 29, 23), 30, utc(2025, 2, 28), utc(2025, 3, 30)),
        # anchor 29: only leap Februaries have a 29th (2000 is one, 2100 is not)
        (utc(2024, 2, 29), 29, utc(2024, 2, 29), utc(2024, 3, 29)),
        (utc(2024, 2, 28), 29, utc(2024, 1, 29), utc(2024, 2, 29)),
        (utc(2025, 2, 27), 29, utc(2025, 1, 29), utc(2025, 2, 28)),
        (utc(2025, 2, 28), 29, utc(2025, 2, 28), utc(2025, 3, 29)),
        (utc(2000, 2, 28, 23), 29, utc(2000, 1, 29), utc(2000, 2, 29)),
        (utc(2100, 2, 28), 29, utc(2100, 2, 28), utc(2100, 3, 29)),
    ],
)
def test_billing_period_examples(
    now: datetime, anchor: int, start: datetime, end: datetime
) -> None:
    assert billing_period(now, anchor) == win(start, end)


def test_billing_period_defaults_to_the_calendar_month_and_ends_on_its_last_second() -> None:
    period = billing_period(utc(2026, 2, 8, 14, 50))
    assert format_time(period.start) == "2026-02-01T00:00:00.000Z"
    assert format_time(period_end_inclusive(period)) == "2026-02-28T23:59:59.000Z"
    leap = billing_period(utc(2024, 2, 8))
    assert period_end_inclusive(leap) == utc(2024, 2, 29, 23, 59, 59)
    assert period_end_inclusive(billing_period(utc(2025, 12, 5))) == utc(2025, 12, 31, 23, 59, 59)


@pytest.mark.parametrize("anchor", [0, 32, -1])
def test_billing_anchor_must_be_a_day_of_month(anchor: int) -> None:
    with pytest.raises(ValueError, match="anchor_day"):
        billing_period(utc(2026, 1, 1), anchor)


@FAST
@given(instants, st.integers(1, 31))
def test_billing_period_matches_day_by_day_reference(now: datetime, anchor: int) -> None:
    period = billing_period(now, anchor)
    assert period.contains(now)
    assert is_period_start(period.start.date(), anchor)
    assert period == brute_billing_period(now, anchor)


# --- first-request windows ----------------------------------------------------------

DAY = utc(2026, 3, 29)
ACTIVITY = [
    DAY.replace(hour=10),
    DAY.replace(hour=10, minute=30),
    DAY.replace(hour=14, minute=59),
    DAY.replace(hour=15),
    DAY.replace(hour=15, minute=1),
    DAY.replace(hour=21),
]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (DAY.replace(hour=9, minute=59), None),
        (DAY.replace(hour=10), win(DAY.replace(hour=10), DAY.replace(hour=15))),
        (
            DAY.replace(hour=14, minute=59, second=59),
            win(DAY.replace(hour=10), DAY.replace(hour=15)),
        ),
        (DAY.replace(hour=15), win(DAY.replace(hour=15), DAY.replace(hour=20))),
        (DAY.replace(hour=20, minute=30), None),
        (utc(2026, 3, 30, 1, 59), win(DAY.replace(hour=21), utc(2026, 3, 30, 2))),
        (utc(2026, 3, 30, 2), None),
    ],
)
def test_current_first_request_window(now: datetime, expected: Window | None) -> None:
    assert current_first_request_window(ACTIVITY, HOURS_5, now) == expected


def test_a_window_starting_after_now_is_not_current() -> None:
    # A gateway running ahead reported a request in a minute that has not begun.
    ahead = [DAY.replace(hour=10, minute=2)]
    assert current_first_request_window(ahead, HOURS_5, DAY.replace(hour=10)) is None
    assert current_first_request_window([], HOURS_5, DAY) is None


def test_a_gap_after_now_does_not_hide_the_current_window() -> None:
    # chain_start over all activity is 1 (the gap lies ahead of `now`), yet the
    # window containing `now` starts at index 0.
    activity = [DAY.replace(hour=10), DAY.replace(hour=15, minute=2)]
    assert chain_start(activity, HOURS_5) == 1
    now = DAY.replace(hour=14, minute=58)
    expected = win(DAY.replace(hour=10), DAY.replace(hour=15))
    assert current_first_request_window(activity, HOURS_5, now) == expected


def test_chain_start_is_the_last_gap_of_at_least_length() -> None:
    assert chain_start(ACTIVITY, HOURS_5) == 5
    assert chain_start(ACTIVITY[:5], HOURS_5) == 0
    exact = [DAY.replace(hour=10), DAY.replace(hour=15)]
    assert chain_start(exact, HOURS_5) == 1
    # A window ending exactly where the next activity lies: that minute starts the next.
    at_end = DAY.replace(hour=15)
    before_end = DAY.replace(hour=14, minute=59)
    assert current_first_request_window(exact, HOURS_5, before_end) == win(
        DAY.replace(hour=10), at_end
    )
    assert current_first_request_window(exact, HOURS_5, at_end) == win(at_end, DAY.replace(hour=20))
    assert chain_start([], HOURS_5) == 0


BadCall = Callable[[Sequence[datetime], timedelta], Any]
FIRST_REQUEST_CALLS: list[BadCall] = [
    chain_start,
    lambda a, n: current_first_request_window(a, n, DAY),
]


@pytest.mark.parametrize("call", FIRST_REQUEST_CALLS)
@pytest.mark.parametrize(
    ("activity", "length", "message"),
    [
        ([DAY.replace(hour=11), DAY.replace(hour=10)], HOURS_5, "ascending"),
        ([DAY, DAY], HOURS_5, "distinct"),
        ([DAY.replace(second=1)], HOURS_5, "floored"),
        ([DAY.replace(microsecond=1)], HOURS_5, "floored"),
        ([datetime(2026, 3, 29)], HOURS_5, "timezone-aware"),
        ([DAY], timedelta(0), "positive whole number of minutes"),
        ([DAY], -HOURS_5, "positive whole number of minutes"),
        ([DAY], timedelta(seconds=90), "positive whole number of minutes"),
    ],
)
def test_first_request_inputs_are_validated(
    call: BadCall, activity: list[datetime], length: timedelta, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(activity, length)


@FAST
@given(minute_starts, offsets, lengths)
def test_chain_start_gives_the_same_last_windows(
    base: datetime, minutes: list[int], length: timedelta
) -> None:
    activity = activity_from(base, minutes)
    i = chain_start(activity, length)
    gaps = [j for j in range(1, len(activity)) if activity[j] - activity[j - 1] >= length]
    assert i == (gaps[-1] if gaps else 0)
    # What query_api/usage.py relies on: from activity[i] on, the history before i
    # changes no window.
    for now in activity[i:]:
        assert current_first_request_window(
            activity[i:], length, now
        ) == current_first_request_window(activity, length, now)
    if activity:
        first = current_first_request_window(activity[i:], length, activity[i])
        assert first is not None
        assert first.start == activity[i]


@FAST
@given(minute_starts, offsets, lengths, st.integers(-120 * 60, 3200 * 60), st.integers(0, 999999))
def test_current_window_matches_brute_force_scan(
    base: datetime, minutes: list[int], length: timedelta, seconds: int, micros: int
) -> None:
    activity = activity_from(base, minutes)
    now = base + timedelta(seconds=seconds, microseconds=micros)
    current = current_first_request_window(activity, length, now)
    assert current == brute_current(activity, length, now)
    # Activity after `now` never changes which window is current.
    assert current == brute_current([t for t in activity if t <= now], length, now)


# --- used percentage ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("used_micro", "limit", "expected"),
    [
        (0, 100.0, 0.0),
        (4_000_000, 100.0, 4.0),
        (143_000_000, 1000.0, 14.3),
        (15_000, 10.0, 0.2),  # 0.15 %: round(0.15, 1) would say 0.1
        (1_500, 1.0, 0.2),  # 0.15 % again, on a limit of 1
        (250_000, 100.0, 0.3),  # 0.25 %: banker's rounding would say 0.2
        (249_999, 100.0, 0.2),
        (150_000_000, 100.0, 150.0),  # over the limit
        (1, 3.0, 0.0),
        (1_000_000, 3.0, 33.3),
        (2_000_000, 3.0, 66.7),
    ],
)
def test_used_percentage_examples(used_micro: int, limit: float, expected: float) -> None:
    assert used_percentage(used_micro, limit) == expected


def test_used_percentage_with_no_allowance() -> None:
    assert used_percentage(0, 0.0) == 0.0
    assert used_percentage(1, 0.0) == 100.0
    assert used_percentage(5_000_000, -1.0) == 100.0


def test_used_percentage_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="used_micro"):
        used_percentage(-1, 10.0)
    with pytest.raises(ValueError, match="finite"):
        used_percentage(1, math.nan)
    with pytest.raises(ValueError, match="finite"):
        used_percentage(1, math.inf)


@FAST
@given(
    st.integers(0, 10**15),
    st.one_of(
        st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False),
        st.integers(1, 10**9).map(float),
    ),
)
def test_used_percentage_matches_fraction_reference(used_micro: int, limit: float) -> None:
    assert used_percentage(used_micro, limit) == brute_percentage(used_micro, limit)


@FAST
@given(st.integers(0, 100_000), st.integers(1, 10**6))
def test_used_percentage_rounds_exact_halves_up(k: int, limit: int) -> None:
    # used / limit * 1000 = k + 1/2 exactly: a tie, which must round up.
    used_micro = (2 * k + 1) * 500 * limit
    assert used_percentage(used_micro, float(limit)) == (k + 1) / 10
    assert used_percentage(used_micro - 1, float(limit)) == k / 10


# --- formatting and naive inputs -------------------------------------------------------


def test_format_time_is_utc_milliseconds_z() -> None:
    assert format_time(utc(2026, 3, 29, 3)) == "2026-03-29T03:00:00.000Z"
    assert format_time(utc(2026, 2, 8, 14, 50, 0, 123999)) == "2026-02-08T14:50:00.123Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 3, 29, 5, tzinfo=plus_two)) == "2026-03-29T03:00:00.000Z"
    assert format_time(utc(999, 1, 2)) == "0999-01-02T00:00:00.000Z"


NAIVE = datetime(2026, 3, 29, 10)


@pytest.mark.parametrize(
    "call",
    [
        minute_window,
        day_window,
        week_window,
        format_time,
        lambda t: fixed_window(t, HOURS_5),
        lambda t: billing_period(t, 15),
        lambda t: current_first_request_window([], HOURS_5, t),
        lambda t: period_end_inclusive(Window(t, t + HOURS_5)),
    ],
)
def test_naive_datetimes_are_rejected(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        call(NAIVE)


def test_epoch_micros_counts_whole_microseconds_from_the_epoch() -> None:
    assert epoch_micros(utc(2100, 1, 1, 0, 0, 0, 999_999)) == 4_102_444_800_999_999
    assert epoch_micros(EPOCH - timedelta(microseconds=1)) == -1
    plus2 = datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    assert epoch_micros(plus2) == epoch_micros(utc(2026, 1, 1))
