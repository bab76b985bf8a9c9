"""Latency histograms as plain numbers, for the hot path.

`observe()` is a bisect and three additions, with no lock and no prometheus
object: the collector (processors/metrics.py) turns the counts into a
Prometheus histogram only when it is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# From a fast local commit (~1 ms) to a broker or store in trouble (retries).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass
class Timings:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    """Observations per bucket (not cumulative); the last one is +Inf."""
    total_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are `le` (inclusive): bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Buckets as Prometheus exposes them: (le, observations <= le), ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), float(running)))
        running += self.counts[-1]
        out.append(("+Inf", float(running)))
        return out
