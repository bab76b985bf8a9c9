"""query_api/limits.py: the plan's limits at an instant, at the edges of the minute and
of the limits, and the headers read from them."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from query_api.limits import plan_headers, plan_limits
from query_api.plans import DEFAULT_PLANS
from query_api.usage import compute
from tests.structured_fields import Item, parse_list

PRO = DEFAULT_PLANS["pro"]
MINUTE = datetime(2026, 2, 8, 14, 44, tzinfo=UTC)


def at(now: datetime, this_minute: int = 0, streams: int = 0) -> dict[str, str]:
    rows = [(MINUTE, this_minute, 0)] if this_minute else []
    usage = compute(rows, PRO, 1, now)
    return plan_headers(plan_limits(PRO, usage, streams, now))


@pytest.mark.parametrize(
    ("offset", "t"),
    [
        (timedelta(0), 60),  # on the boundary: a whole minute to go
        (timedelta(microseconds=1), 60),
        (timedelta(seconds=47, microseconds=250_000), 13),
        (timedelta(seconds=59), 1),
        (timedelta(seconds=59, microseconds=999_999), 1),  # never 0 before the reset
    ],
)
def test_t_counts_up_to_the_next_minute_boundary(offset: timedelta, t: int) -> None:
    headers = at(MINUTE + offset)
    assert headers["X-RateLimit-Reset"] == str(int((MINUTE + timedelta(minutes=1)).timestamp()))
    assert headers["RateLimit"] == f'"minute";r=300;t={t}, "streams";r=10'


def test_remaining_never_goes_below_zero() -> None:
    headers = at(MINUTE + timedelta(seconds=5), this_minute=301, streams=11)
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["RateLimit"] == '"minute";r=0;t=55, "streams";r=0'


@given(
    offset_us=st.integers(0, 60_000_000 - 1),
    used=st.integers(0, 1_000),
    streams=st.integers(0, 30),
)
def test_the_fields_restate_x_ratelimit(offset_us: int, used: int, streams: int) -> None:
    now = MINUTE + timedelta(microseconds=offset_us)
    headers = at(now, used, streams)
    reset = int(headers["X-RateLimit-Reset"])
    (minute, stream) = parse_list(headers["RateLimit"])
    assert isinstance(minute, Item)
    assert isinstance(stream, Item)
    assert minute == Item(
        "minute", {"r": int(headers["X-RateLimit-Remaining"]), "t": minute.params["t"]}
    )
    t = minute.params["t"]
    assert isinstance(t, int)
    # Waiting t seconds reaches the reset, and not a second more.
    assert reset <= now.timestamp() + t < reset + 1
    assert t == math.ceil(reset - now.timestamp())
    assert stream == Item("streams", {"r": max(0, PRO.max_streams - streams)})


def test_an_accounts_partition_mark_is_its_own_partitions_time() -> None:
    """routes/limits.partition_mark: Kafka's murmur2 partition of the account id, and
    that partition's time; none when the gateway sent no count or it has no marker."""
    from producers.partitioning import partition_for
    from query_api.routes.limits import partition_mark

    marks = {p: datetime(2030, 1, 1, 0, 0, p, tzinfo=UTC) for p in range(8)}
    for account in ("acme", "bolt", "c-42"):
        p = partition_for(account, 8)
        assert partition_mark(account, 8, marks) == (p, marks[p])
        assert partition_mark(account, None, marks) == (None, None)
        missing = {q: t for q, t in marks.items() if q != p}
        assert partition_mark(account, 8, missing) == (p, None)
    # The three land on more than one partition, so the marks differ between them.
    assert len({partition_for(a, 8) for a in ("acme", "bolt", "c-42")}) > 1
