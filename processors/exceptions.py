"""What the worker and the sink raise on purpose: each a `schemas.exceptions.TallyError`.

Both are fencing: Kafka's transactions (the worker) or the store's write gates (the
sink) tell a process that a successor owns its partitions now. Neither is a failure
to report: the process lets the partitions go and its successor resumes them.
"""

from __future__ import annotations

from schemas.exceptions import TallyError


class FencedError(TallyError):
    """Another worker owns this partition now; this one must let it go."""


class OutputClosedError(TallyError):
    """This worker dropped the partition's output (revoked, fenced, stopping) while a
    commit was in flight or waiting: the partition's next owner resumes it."""


class SinkFencedError(TallyError):
    """This sink's write gate is gone: another sink took its partitions over."""
