"""RefusalHold (query_api/refusals.py): how long a 429 is held, and its headers after."""

from __future__ import annotations

import asyncio

import pytest

from query_api.ratelimit import Decision
from query_api.refusals import FAILED_KEY_HOLD_S, RefusalHold


def refused(retry_after: float, reset_after: float = 2.0) -> Decision:
    return Decision(
        allowed=False,
        limit=10,
        remaining=0,
        retry_after=retry_after,
        reset_after=reset_after,
        refill_s=2.0,
    )


class SteppingClock:
    """Moves on by `step` each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_held_until_a_retry_could_succeed_at_most_the_cap() -> None:
    hold = RefusalHold(max_delay_s=1.0, max_held=10)
    assert hold.delay_for(refused(0.02)) == 0.02
    assert hold.delay_for(refused(7.5)) == 1.0
    assert hold.delay_for(refused(0.0)) == 0.0
    assert RefusalHold(max_delay_s=0.0, max_held=10).delay_for(refused(3.0)) == 0.0


def test_no_hold_once_max_held_are_held() -> None:
    hold = RefusalHold(max_delay_s=1.0, max_held=2)
    hold.held = 2
    assert hold.delay_for(refused(0.5)) == 0.0
    hold.held = 1
    assert hold.delay_for(refused(0.5)) == 0.5


async def test_the_refusal_sent_counts_from_when_it_is_sent() -> None:
    # The clock says 0.25 s passed while held, whatever the real sleep took.
    hold = RefusalHold(max_delay_s=1.0, max_held=10, clock=SteppingClock(0.25))
    sent = await hold.hold(refused(0.01, reset_after=2.0))
    assert sent.retry_after == 0.0  # never below 0
    assert sent.reset_after == pytest.approx(1.75)
    assert (sent.allowed, sent.limit, sent.remaining) == (False, 10, 0)
    assert hold.held == 0


async def test_held_refusals_are_counted_while_held() -> None:
    hold = RefusalHold(max_delay_s=1.0, max_held=10)
    waiting = asyncio.ensure_future(hold.hold(refused(0.2)))
    await asyncio.sleep(0.05)
    assert hold.held == 1
    await waiting
    assert hold.held == 0
    # Cancelled while held (the client went away): no longer counted.
    cancelled = asyncio.ensure_future(hold.hold(refused(0.5)))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert hold.held == 0


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        RefusalHold(max_delay_s=-1.0, max_held=1)


def test_requests_without_a_valid_key_wait_at_least_the_failed_key_hold() -> None:
    hold = RefusalHold(max_delay_s=1.0, max_held=10)
    assert hold.delay_for(refused(0.02), failed_key=True) == FAILED_KEY_HOLD_S
    assert hold.delay_for(refused(0.6), failed_key=True) == 0.6
    assert hold.delay_for(refused(3.0), failed_key=True) == 1.0
    # The cap wins: 0 turns holding off for everyone.
    assert RefusalHold(max_delay_s=0.0, max_held=10).delay_for(refused(0.02), failed_key=True) == 0
    assert (
        RefusalHold(max_delay_s=0.1, max_held=10).delay_for(refused(0.02), failed_key=True) == 0.1
    )
