"""The API's token buckets (query_api/ratelimit.py), on an injected clock."""

from __future__ import annotations

import pytest

from query_api.ratelimit import Decision, RateLimiter, TokenBucket


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(limiter: RateLimiter, key: str) -> int:
    """Requests allowed before the first refusal (with the clock standing still)."""
    allowed = 0
    while limiter.hit(key).allowed:
        allowed += 1
        assert allowed < 10_000, "the bucket never ran dry"
    return allowed


# -- the bucket ---------------------------------------------------------------------


def test_a_new_bucket_allows_exactly_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, capacity=5, now=0.0)
    decisions = [bucket.take(0.0) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)


def test_refill_is_rate_times_elapsed_and_capped_at_capacity() -> None:
    bucket = TokenBucket(rate=2.0, capacity=5, now=0.0)
    for _ in range(5):
        bucket.take(0.0)
    assert not bucket.take(0.0).allowed
    # 0.25 s at 2/s is half a token: still refused, and refusing takes nothing.
    refused = bucket.take(0.25)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.25)
    assert refused.reset_after == pytest.approx(2.25)
    # At 0.5 s the token is whole.
    allowed = bucket.take(0.5)
    assert allowed.allowed
    assert allowed.remaining == 0
    # A long idle time refills to capacity, never beyond.
    assert bucket.peek(100.0).remaining == 5
    assert sum(bucket.take(100.0).allowed for _ in range(10)) == 5


def test_fractional_rates_add_up_without_float_drift() -> None:
    bucket = TokenBucket(rate=0.1, capacity=1, now=0.0)
    assert bucket.take(0.0).allowed
    t = 0.0
    for _ in range(10):  # ten steps of 1 s: 0.1 x 10 is 0.9999999999999999 in floats
        t += 1.0
        bucket.peek(t)
    assert bucket.take(t).allowed


def test_retry_after_header_value_is_a_whole_second_at_least() -> None:
    bucket = TokenBucket(rate=1000.0, capacity=1, now=0.0)
    bucket.take(0.0)
    refused = bucket.take(0.0)
    assert refused.retry_after == pytest.approx(0.001)
    assert refused.retry_after_s == 1
    slow = TokenBucket(rate=0.4, capacity=1, now=0.0)
    slow.take(0.0)
    assert slow.take(0.0).retry_after_s == 3  # 2.5 s, rounded up


def test_a_clock_stepping_back_neither_mints_nor_burns_tokens() -> None:
    bucket = TokenBucket(rate=1.0, capacity=2, now=10.0)
    bucket.take(10.0)
    assert bucket.take(5.0).remaining == 0  # the second token; no refill from going back
    assert not bucket.take(5.0).allowed
    assert bucket.take(11.0).allowed  # one second after the latest time seen


@pytest.mark.parametrize(("rate", "capacity"), [(0, 5), (-1, 5), (float("inf"), 5), (1, 0.5)])
def test_nonsense_parameters_are_refused(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, capacity, 0.0)


# -- the limiter --------------------------------------------------------------------


def test_keys_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=3, clock=clock)
    assert drain(limiter, "key:a") == 3
    assert drain(limiter, "key:b") == 3
    assert not limiter.hit("key:a").allowed


def test_the_injected_clock_drives_recovery() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=4.0, burst=2, clock=clock)
    assert drain(limiter, "k") == 2
    refused = limiter.hit("k")
    assert refused == Decision(
        allowed=False, limit=2, remaining=0, retry_after=0.25, reset_after=0.5, refill_s=0.5
    )
    clock.advance(0.25)
    assert limiter.hit("k").allowed
    assert not limiter.hit("k").allowed
    clock.advance(10)
    assert drain(limiter, "k") == 2  # full again, not more


def test_peek_takes_nothing_and_creates_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert limiter.peek("never-seen").allowed
    assert len(limiter) == 0
    limiter.hit("k")
    for _ in range(5):
        assert limiter.peek("k").remaining == 1
    limiter.hit("k")
    assert not limiter.peek("k").allowed


def test_idle_buckets_are_forgotten_once_they_would_be_full() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=20, clock=clock)  # 2 s from empty to full
    for i in range(50):
        limiter.hit(f"ip:10.0.0.{i}")
    assert len(limiter) == 50
    clock.advance(1.0)
    limiter.hit("key:busy")
    assert len(limiter) == 51  # not full yet: forgetting them would refill them early
    clock.advance(1.0)
    limiter.hit("key:busy")
    assert len(limiter) == 1  # only the busy one remains


def test_forgetting_an_idle_bucket_changes_no_answer() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=3, clock=clock)
    assert drain(limiter, "a") == 3
    clock.advance(3.0)  # exactly the refill time: full again
    limiter.hit("other")  # evicts "a"
    assert drain(limiter, "a") == 3


def test_the_number_of_buckets_is_capped() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=5, clock=clock, max_keys=100)
    for i in range(10_000):
        limiter.hit(f"ip:{i}")
        assert len(limiter) <= 100
    assert len(limiter) == 100
    # The most recently used ones are kept; the least recently used are gone.
    assert limiter.peek("ip:9999").remaining == 4
    assert limiter.peek("ip:0").remaining == 5


def test_a_recently_used_bucket_survives_the_cap() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock, max_keys=3)
    assert drain(limiter, "kept") == 2
    for name in ("x", "y"):
        limiter.hit(name)
    limiter.hit("kept")  # refused, but it counts as use: now the most recent
    limiter.hit("z")  # pushes out the least recently used, "x"
    assert not limiter.hit("kept").allowed
    assert limiter.peek("x").remaining == 2


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(rate=1.0, burst=1, max_keys=0)


# -- charging by cost ---------------------------------------------------------------


def test_a_charge_puts_the_bucket_in_debt_that_the_refill_pays_off() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=4, clock=clock)
    assert limiter.hit("k").allowed  # 3 left
    limiter.charge("k", 5)  # -2: three tokens short of the next request
    refused = limiter.hit("k")
    assert not refused.allowed
    assert refused.remaining == 0  # never negative, even in debt
    assert refused.retry_after == pytest.approx(1.5)
    assert refused.reset_after == pytest.approx(3.0)
    clock.advance(1.49)
    assert not limiter.hit("k").allowed
    clock.advance(0.02)
    assert limiter.hit("k").allowed


def test_debt_is_bounded_by_one_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=3, clock=clock)
    limiter.charge("k", 1_000)
    # At most -capacity: the whole bucket and one more token away.
    assert limiter.hit("k").retry_after == pytest.approx(4.0)
    clock.advance(4.0)
    assert limiter.hit("k").allowed


def test_a_bucket_in_debt_is_not_forgotten_before_it_has_refilled() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)  # 2 s from empty to full
    limiter.charge("debtor", 4)  # -2: 4 s from full
    clock.advance(3.0)
    limiter.hit("other")  # would evict a bucket idle for the refill time
    # Remembered with the 1 token it has refilled (forgotten, it would have had 2).
    assert limiter.hit("debtor").remaining == 0


def test_charging_nothing_changes_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, clock=FakeClock())
    limiter.charge("k", 0)
    assert len(limiter) == 0
    assert drain(limiter, "k") == 2
