"""What the gateway library raises beyond ValueError (bad arguments, unsendable events)
and RuntimeError (a gateway used outside its lifecycle).

Each derives from `schemas.exceptions.TallyError` (the tree is drawn there) and
keeps the builtin base callers catch: a `GatewaySendError` is a RuntimeError, a
`FlushTimeoutError` a TimeoutError. Every refusal of the spool, full or locked, is
a `SpoolError`.
"""

from __future__ import annotations

from schemas.events import AnyEvent
from schemas.exceptions import OperatorError, TallyError


class GatewaySendError(TallyError, RuntimeError):
    """Kafka did not acknowledge some messages; their events were not delivered."""

    def __init__(
        self, message: str, failed_events: tuple[bytes, ...], causes: tuple[BaseException, ...]
    ) -> None:
        super().__init__(message)
        self.failed_events = failed_events
        """Each undelivered event, encoded; `schemas.events.EVENT_ADAPTER.validate_json`
        turns one back into an event to record again."""
        self.causes = causes


class GatewayStartError(OperatorError):
    """`start` could not reach the events topic (broker down, no such topic, a topic
    whose partitions are not 0..n-1); the hint says what to check."""


class SpoolError(TallyError, RuntimeError):
    """The spool cannot be used as asked."""


class SpoolLockedError(SpoolError):
    """Another process (or another Spool in this one) owns the directory."""


class SpoolFullError(SpoolError):
    """Kafka is unreachable and the spool is full: this event was NOT recorded."""

    def __init__(self, message: str, event: AnyEvent) -> None:
        super().__init__(message)
        self.event = event


class FlushTimeoutError(TallyError, TimeoutError):
    """`flush` gave up waiting; the events are still buffered and still being sent."""

    def __init__(self, message: str, pending: int) -> None:
        super().__init__(message)
        self.pending = pending
