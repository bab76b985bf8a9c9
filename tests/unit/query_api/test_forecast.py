"""The forecast (query_api/alerts/forecast.py) against a brute-force computation over
generated traffic: raw events, not minute rows, and exhaustion found by stepping the
clock forward second by second."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from query_api.alerts.forecast import forecast
from query_api.queries import MinuteRow
from schemas.windows import Window, fixed_window, used_percentage

M = 1_000_000


def traffic(seed: int, start: datetime, now: datetime) -> list[tuple[datetime, int]]:
    """Events (time, units in millionths) at random seconds, bursts and lulls."""
    rng = random.Random(seed)
    events = []
    t = start
    while t < now:
        t += timedelta(seconds=rng.choice([1, 5, 30, 120, 900]))
        if t < now:
            events.append((t, rng.randint(1, 5) * M))
    return events


def minute_rows(events: list[tuple[datetime, int]]) -> list[MinuteRow]:
    per: dict[datetime, int] = {}
    for t, units in events:
        minute = t.replace(second=0, microsecond=0)
        per[minute] = per.get(minute, 0) + units
    return [(m, 1, u) for m, u in sorted(per.items())]


def brute(
    events: list[tuple[datetime, int]], window: Window, limit: float, now: datetime
) -> tuple[float, datetime | None]:
    used = sum(u for t, u in events if window.start <= t < window.end)
    # The rate span: the window's part of the hour of minutes ending with now's minute.
    floor_now = datetime(now.year, now.month, now.day, now.hour, now.minute, tzinfo=UTC)
    span_start = max(window.start, floor_now - timedelta(minutes=59))
    recent = sum(u for t, u in events if span_start <= t <= now)
    seconds = max((now - span_start).total_seconds(), 60.0)
    per_second = recent / seconds
    projected = used + per_second * (window.end - now).total_seconds()
    if used_percentage(used, limit) >= 100:
        return used_percentage(round(projected), limit), now
    exhausted = None
    level, t = float(used), now
    while per_second > 0 and t < window.end:
        t += timedelta(seconds=1)
        level += per_second
        if level >= limit * M:
            exhausted = t
            break
    return used_percentage(round(projected), limit), exhausted


@pytest.mark.parametrize("seed", range(12))
def test_forecast_matches_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    window = fixed_window(datetime(2026, 3, 30, 10, 0, tzinfo=UTC), timedelta(hours=5))
    now = window.start + timedelta(seconds=rng.randint(30, 5 * 3600 - 30))
    events = traffic(seed, window.start - timedelta(hours=1), now)
    limit = rng.choice([50.0, 200.0, 1_000.0, 5_000.0])
    got = forecast(minute_rows(events), window, limit, now)
    projected, exhausted = brute(events, window, limit, now)
    assert got.projected_percentage == pytest.approx(projected, abs=0.1)
    if exhausted is None:
        assert got.exhausted_at is None or got.exhausted_at >= window.end - timedelta(seconds=1)
    else:
        assert got.exhausted_at is not None
        assert abs((got.exhausted_at - exhausted).total_seconds()) <= 1.0


def test_no_traffic_projects_the_usage_and_no_exhaustion() -> None:
    window = fixed_window(datetime(2026, 3, 30, 10, 0, tzinfo=UTC), timedelta(hours=5))
    now = window.start + timedelta(hours=2)
    got = forecast([(window.start, 1, 30 * M)], window, 100, now)
    assert (got.projected_percentage, got.exhausted_at, got.rate_micro_per_s) == (30.0, None, 0)


def test_usage_before_the_window_sets_no_rate() -> None:
    window = fixed_window(datetime(2026, 3, 30, 10, 0, tzinfo=UTC), timedelta(hours=5))
    before = [(window.start - timedelta(minutes=m), 1, 10 * M) for m in range(1, 30)]
    got = forecast(before, window, 100, window.start + timedelta(seconds=30))
    assert got.rate_micro_per_s == 0
    assert got.exhausted_at is None
