"""history_start_any_anchor: one read that serves every billing anchor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from query_api.usage import history_start, history_start_any_anchor

INSTANTS = [
    datetime(2026, 3, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 3, 29, 12, 30, tzinfo=UTC),
    datetime(2024, 2, 29, 23, 59, tzinfo=UTC),
    datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
]


@pytest.mark.parametrize("now", INSTANTS)
@pytest.mark.parametrize("days", [1.0, 20.0, 42.0])
def test_reads_at_least_as_far_back_as_any_anchor_needs(now: datetime, days: float) -> None:
    history = timedelta(days=days)
    found = history_start_any_anchor(now, history)
    needed = [history_start(now, history, day) for day in range(1, 32)]
    assert found == min(needed)
    assert all(found <= start for start in needed)


def test_long_history_is_just_the_history() -> None:
    # Any billing period began less than 32 days ago, so 42 days of history cover it.
    now = datetime(2026, 3, 29, 12, 30, tzinfo=UTC)
    assert history_start_any_anchor(now, timedelta(days=42)) == now - timedelta(days=42)


def test_short_history_reaches_the_earliest_billing_period_start() -> None:
    now = datetime(2026, 3, 29, 12, 30, tzinfo=UTC)
    # Anchor 30: the period began on Feb 28 (February has no 30th), the earliest of all.
    assert history_start_any_anchor(now, timedelta(days=1)) == datetime(2026, 2, 28, tzinfo=UTC)
