"""What a worker counts about itself, read by its metrics (processors/metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from processors.timing import Timings


@dataclass
class WorkerStats:
    messages: int = 0
    counted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    replayed: int = 0
    remembered: int = 0
    """Messages re-read after a takeover to rebuild dedup memory."""
    transactions: int = 0
    fenced: int = 0
    flushes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    last_flush_unix: float = 0.0
    commit_seconds: Timings = field(default_factory=Timings)
    """Kafka transaction commit latency, retries included (for metrics)."""
