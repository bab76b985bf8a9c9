"""Garbage-collector settings for the long-running processes (worker, sink, API).

The worker allocates millions of short-lived tuples and lists per batch. At
CPython's default gen-0 threshold (700 allocations) the cyclic collector runs
thousands of times per batch, and every full collection walks the long-lived
dedup keys. Freezing what start-up allocated and collecting less often cut the
worker's CPU per event by 15-30 % in `make bench` (benchmarks/NOTES.md). Memory
is still bounded: reference counting frees the acyclic garbage, which is nearly
all of it.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once, after imports and set-up, before the hot loop starts."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 20, 100)
