"""Mixed random traffic for the pipeline and reconcile tests: requests, streams opened
and closed (a close only for a stream opened earlier), spread back in time.

One generator; each test gives its shape (how many accounts, how far back, the share
of stream events and what a request carries). Same seed, same events.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from producers import events as build

Draw = Callable[[random.Random], dict[str, Any]]


@dataclass(frozen=True)
class Shape:
    events: int
    accounts: int
    account_digits: int
    sources: int
    span_s: float
    """Event times fall in [now - span_s, now]."""
    opens: float
    """Share of stream-opened events; the next `closes - opens` are closes."""
    closes: float
    request: Draw
    """A request's keyword arguments (units, route, …) from the generator."""
    closed_units: Draw
    opened: dict[str, Any] = field(default_factory=dict)


def mixed_traffic(rng: random.Random, now: datetime, shape: Shape) -> list[Any]:
    made: list[Any] = []
    open_streams: list[tuple[str, str, str]] = []
    for i in range(shape.events):
        account = f"acct-{rng.randrange(shape.accounts):0{shape.account_digits}d}"
        source = f"gw-{rng.randrange(shape.sources)}"
        at = now - timedelta(seconds=rng.uniform(0, shape.span_s))
        roll = rng.random()
        if roll < shape.opens:
            stream_id = f"s{i}"
            open_streams.append((account, source, stream_id))
            made.append(build.stream_opened(account, source, stream_id, time=at, **shape.opened))
        elif roll < shape.closes and open_streams:
            account, source, stream_id = open_streams.pop(rng.randrange(len(open_streams)))
            closed = shape.closed_units(rng)
            made.append(build.stream_closed(account, source, stream_id, time=at, **closed))
        else:
            made.append(build.request(account, source, time=at, **shape.request(rng)))
    return made
