"""What the gateway library raises beyond ValueError (bad arguments, unsendable events)
and RuntimeError (a gateway used outside its lifecycle); `producers.spool` has its own
(SpoolError, SpoolLockedError)."""

from __future__ import annotations

from producers.events import AnyEvent


class GatewaySendError(RuntimeError):
    """Kafka did not acknowledge some messages; their events were not delivered."""

    def __init__(
        self, message: str, failed_events: tuple[bytes, ...], causes: tuple[BaseException, ...]
    ) -> None:
        super().__init__(message)
        self.failed_events = failed_events
        """Each undelivered event, encoded; `schemas.events.EVENT_ADAPTER.validate_json`
        turns one back into an event to record again."""
        self.causes = causes


class SpoolFullError(RuntimeError):
    """Kafka is unreachable and the spool is full: this event was NOT recorded."""

    def __init__(self, message: str, event: AnyEvent) -> None:
        super().__init__(message)
        self.event = event


class FlushTimeoutError(TimeoutError):
    """`flush` gave up waiting; the events are still buffered and still being sent."""

    def __init__(self, message: str, pending: int) -> None:
        super().__init__(message)
        self.pending = pending
