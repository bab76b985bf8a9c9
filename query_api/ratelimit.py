"""The API's own rate limit: a token bucket per caller, in process memory (pure).

This protects the API (and the store behind it) from its callers; it is not the
plan's `per_minute` limit, which gateways enforce and `/api/v1/account/usage`
reports. Each caller has a bucket of `burst` tokens refilled at `rate` tokens per
second; a request takes one token, or is refused until one has refilled.

The buckets live in the memory of one API process: with M replicas behind a load
balancer a caller may make up to M x the limit. That is deliberate: the limit guards
each replica's capacity, and sharing buckets would put a store round trip on every
request.

Memory is bounded. A bucket untouched for long enough to have refilled completely
is the same as a new one, so it is dropped (no caller can tell). Beyond `max_keys`
buckets the least recently used ones are dropped too; that one is not invisible
(the evicted caller gets a full bucket back), so it only happens when more distinct
callers than `max_keys` were active within one refill time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
"""Seconds on a monotonic scale; only differences matter."""

DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against its caller's bucket."""

    allowed: bool
    limit: int
    """The bucket's capacity: how many requests may come in one burst."""
    remaining: int
    """Whole tokens left after this request."""
    retry_after: float
    """Seconds until the next request would be allowed (0 when one would be now)."""
    reset_after: float
    """Seconds until the bucket is full again."""
    refill_s: float
    """Seconds an empty bucket takes to fill: `limit` requests per `refill_s` is the
    policy's window (query_api/limits.py reports it as RateLimit-Policy's `w`)."""

    @property
    def retry_after_s(self) -> int:
        """`retry_after` for a Retry-After header: whole seconds, at least 1, so a
        client that sleeps that long is never refused again for the same reason."""
        return max(1, math.ceil(self.retry_after))


class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate` per second. Starts full."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if capacity < 1 or not math.isfinite(capacity):
            raise ValueError(f"capacity must be at least 1, not {capacity!r}")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        # A clock that steps back (it should not: monotonic) must not mint tokens
        # nor take them away; only elapsed time counts.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)

    def _decision(self, allowed: bool) -> Decision:
        missing = max(0.0, 1.0 - self.tokens)
        return Decision(
            allowed=allowed,
            limit=math.floor(self.capacity),
            # Rounding down: never promise a request that would be refused.
            remaining=max(0, math.floor(self.tokens + 1e-9)),
            retry_after=missing / self.rate,
            reset_after=(self.capacity - self.tokens) / self.rate,
            refill_s=self.capacity / self.rate,
        )

    def take(self, now: float, cost: float = 1.0) -> Decision:
        """Take `cost` tokens if there are that many; refusing takes nothing."""
        self._refill(now)
        # The epsilon absorbs float error in refill sums: 0.1 x 10 is 0.9999999999999999.
        if self.tokens + 1e-9 >= cost:
            self.tokens = max(0.0, self.tokens - cost)
            return self._decision(True)
        return self._decision(False)

    def charge(self, now: float, cost: float) -> None:
        """Take `cost` tokens after the fact, for work already done: the bucket may go
        into debt (down to -capacity), and the caller waits until it refills."""
        self._refill(now)
        self.tokens = max(-self.capacity, self.tokens - cost)

    def full_after(self) -> float:
        """Seconds from `updated` until the bucket is full again."""
        return (self.capacity - self.tokens) / self.rate

    def peek(self, now: float) -> Decision:
        """Whether one token is there, without taking it."""
        self._refill(now)
        return self._decision(self.tokens + 1e-9 >= 1.0)


class RateLimiter:
    """Token buckets by caller key, with bounded memory. Thread-safe."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        # Validates rate and burst up front; a full bucket's answer is the same at
        # any time, so peeking at a caller without a bucket needs no new one.
        self._full = TokenBucket(rate, burst, 0.0).peek(0.0)
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        # Least recently used first: the front is always the longest idle bucket,
        # so idle ones are found without scanning.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()
        self._refill_time = burst / rate

    def __len__(self) -> int:
        return len(self._buckets)

    def hit(self, key: str) -> Decision:
        """One request by `key`: takes a token when there is one."""
        with self._lock:
            now = self.clock()
            return self._bucket(key, now).take(now)

    def charge(self, key: str, cost: float) -> None:
        """Charge `key` `cost` more tokens for a request it was already allowed (an
        answer worth more than one request): its next requests wait for the refill."""
        if cost <= 0:
            return
        with self._lock:
            now = self.clock()
            self._bucket(key, now).charge(now, cost)

    def peek(self, key: str) -> Decision:
        """Would a request by `key` be allowed now? Takes nothing."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:  # no bucket is a full bucket: don't create one to look
                return self._full
            # Peeking refills (moves `updated`), so keep the order by `updated`.
            self._buckets.move_to_end(key)
            return bucket.peek(now)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        self._evict_idle(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def _evict_idle(self, now: float) -> None:
        # A bucket last touched a whole refill time ago is full whatever it held:
        # forgetting it changes nothing for its caller. One in debt (charge) takes
        # longer; it stays at the front until then, which only delays evicting the rest.
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if now - bucket.updated < max(self._refill_time, bucket.full_after()):
                break
            self._buckets.popitem(last=False)
