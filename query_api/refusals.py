"""When the API sends a 429 of its own limit: no sooner than a retry could succeed.

A caller over its bucket (query_api/ratelimit.py) is refused; a compliant client then
waits `Retry-After` and tries again. A client that ignores it and retries as soon as
the answer arrives turns each refusal into another request, and a few such clients
keep the API's one event loop busy answering 429s, delaying everyone else's answers.
So the refusal is held: sent after `min(max_delay_s, retry_after)` seconds, the time
its bucket needs before the caller's next request could be allowed anyway (capped).

- A compliant client loses nothing: it could not have been served sooner.
- Requests without a valid key that are over their address's budget (key guessing,
  unauthenticated floods) wait at least `FAILED_KEY_HOLD_S`, as failed logins are
  slowed: no caller with a real key is among them (a valid key never spends it).
- A client retrying at once is slowed to about one request per refill interval per
  connection, and a held refusal costs no CPU (a sleeping coroutine; the unread body
  of a refused upload stays in the socket, paused by the server's flow control).
- At most `max_held` refusals are held at once; beyond that they are sent at once, so
  a flood of connections cannot pile up memory here. Connection floods are a proxy's
  job (docs/api.md#conventions).

The headers of a held 429 describe the bucket when it is sent: `Retry-After` and the
reset time are shortened by the time held, as the limiter's clock measures it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from query_api.ratelimit import Clock, Decision

FAILED_KEY_HOLD_S = 0.25
"""The shortest hold of a 429 for requests without a valid key (capped by max_delay_s)."""


class RefusalHold:
    """Holds 429s as the module docstring says. One per API process (event loop)."""

    def __init__(self, max_delay_s: float, max_held: int, clock: Clock = time.monotonic) -> None:
        if max_delay_s < 0 or max_held < 0:
            raise ValueError(f"max_delay_s and max_held must be >= 0: {max_delay_s}, {max_held}")
        self.max_delay_s = max_delay_s
        self.max_held = max_held
        self.clock = clock
        """The rate limiter's clock: what the held time is measured on."""
        self.held = 0
        """Refusals being held right now."""

    def delay_for(self, refused: Decision, *, failed_key: bool = False) -> float:
        """Seconds to hold `refused`: until its caller could be allowed (at least
        FAILED_KEY_HOLD_S for requests without a valid key), at most `max_delay_s`;
        0 when `max_held` refusals are held already."""
        if self.held >= self.max_held:
            return 0.0
        wait = max(refused.retry_after, FAILED_KEY_HOLD_S if failed_key else 0.0)
        return max(0.0, min(self.max_delay_s, wait))

    async def hold(self, refused: Decision, *, failed_key: bool = False) -> Decision:
        """Wait `delay_for(refused)`; the refusal as it stands when sent."""
        delay = self.delay_for(refused, failed_key=failed_key)
        if delay <= 0:
            return refused
        self.held += 1
        started = self.clock()
        try:
            await asyncio.sleep(delay)
        finally:
            self.held -= 1
        waited = max(0.0, self.clock() - started)
        return dataclasses.replace(
            refused,
            retry_after=max(0.0, refused.retry_after - waited),
            reset_after=max(0.0, refused.reset_after - waited),
        )
