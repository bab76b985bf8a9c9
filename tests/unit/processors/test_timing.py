from __future__ import annotations

import pytest

from processors.timing import Timings


def test_buckets_are_inclusive_and_cumulative() -> None:
    timings = Timings(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        timings.observe(seconds)
    assert timings.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert timings.count == 5
    assert timings.total_s == pytest.approx(4.65)


def test_an_empty_histogram_has_zero_counts() -> None:
    assert Timings(bounds=(1.0,)).cumulative() == [("1.0", 0.0), ("+Inf", 0.0)]
