"""The gateway's accounts: how many events were recorded, are not safe yet, were
acknowledged, failed or spooled, and the waits that depend on those numbers.

Invariant: `unacked` counts the events recorded and neither acknowledged by Kafka,
failed for good, nor written to the spool. Every part of the gateway that makes events
safe lowers it and then calls `after_settle`, which wakes whoever waits for room in the
buffer (`room`) or for every event to be safe (`wait_safe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from producers.batches import Batch

log = logging.getLogger("producers.gateway")


@dataclass(frozen=True, slots=True)
class Failure:
    """A batch Kafka refused for good (or no message can carry), with the reason."""

    batch: Batch
    error: BaseException


@dataclass(slots=True, eq=False)
class Ledger:
    topic: str
    resume_at: int
    """`record` waiting for room resumes once `unacked` is down to this."""

    recorded: int = 0
    unacked: int = 0
    messages: int = 0
    acked: int = 0
    failed: int = 0
    bytes_sent: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    spool_full: bool = False
    """Kafka is unreachable and the spool took nothing at the last attempt."""
    failures: list[Failure] = field(default_factory=list)
    """Raised, and emptied, by the next flush/close."""
    room: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when `record` waiting for room should look again."""
    _safe_waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def settle(self, batch: Batch, error: BaseException | None) -> None:
        """Kafka acknowledged `batch` (error None), or refused it for good."""
        count = batch.count
        self.unacked -= count
        if error is None:
            self.acked += count
        else:
            self.failed += count
            self.failures.append(Failure(batch, error))
            where = "by key" if batch.partition is None else f"partition {batch.partition}"
            log.error(
                "Kafka did not acknowledge a message of %d event(s) to %s (%s): %r",
                count,
                self.topic,
                where,
                error,
            )
        if batch.receipts:
            for receipt in batch.receipts:
                receipt.settle(error)
        self.after_settle()

    def after_settle(self) -> None:
        if self.unacked <= self.resume_at:
            self.room.set()
        if self.unacked == 0 and self._safe_waiters:
            waiters, self._safe_waiters = self._safe_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_safe(self, deadline: float) -> bool:
        """Until every recorded event is acknowledged, failed or spooled; False at deadline."""
        loop = asyncio.get_running_loop()
        while self.unacked > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._safe_waiters.append(waiter)
            await asyncio.wait([waiter], timeout=remaining)
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._safe_waiters.remove(waiter)
        return True

    def take_failures(self) -> list[Failure]:
        failures, self.failures = self.failures, []
        return failures
