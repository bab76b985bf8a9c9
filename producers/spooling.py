"""Spooling: while Kafka does not take messages, batches go to a bounded disk queue
(`producers.spool`) instead of piling up in memory, oldest first, in recording order.

The watchdog starts it when Kafka leaves a message unacknowledged for
`unreachable_after_s`; the sender starts it when Kafka fails a message with a
connection-type error. `producers.replay` sends the spool back to Kafka; once it is
empty, batches go straight to Kafka again (`Route`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

from producers.batches import Batch, Outgoing
from producers.kafka_edge import Link, future_error, retrieve
from producers.ledger import Ledger
from producers.sending import Sender
from producers.spool import FsyncPolicy, Spool, SpoolPosition
from producers.spool_format import count_events, encode_spooled

log = logging.getLogger("producers.gateway")

_T = TypeVar("_T")

SpoolFullPolicy = Literal["block", "reject"]

_DRAIN_BATCHES = 512
_DRAIN_BYTES = 8 * 1024 * 1024


class Route(Enum):
    """Where the sender puts the next batch."""

    DIRECT = "to Kafka"
    SPOOL = "to the spool: Kafka is unreachable, or the spool holds older batches"
    SPOOL_DRAINED = (
        "to the spool until it is empty again: the replayer emptied it and Kafka "
        "acknowledged all of it, so direct sends cannot overtake anything"
    )


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    directory: Path
    max_bytes: int
    fsync: FsyncPolicy
    full_policy: SpoolFullPolicy
    unreachable_s: float
    """Kafka silent this long on a message: it is unreachable."""
    directory_is_default: bool
    """The default layout: `<data_dir>/spool/<topic>/<client>`, tidied up when empty."""


class Spooler:
    """The write side of the spool, and the switch between direct sends and spooling.

    Implements `producers.sending.Diversion` for the sender.
    """

    def __init__(
        self, config: SpoolConfig, ledger: Ledger, sender: Sender, link: Link, bootstrap: str
    ) -> None:
        self.config = config
        self._ledger = ledger
        self._sender = sender
        self._link = link
        self._bootstrap = bootstrap
        self.spool: Spool | None = None
        self.route = Route.DIRECT
        self.partitions = 0
        """The topic's partition count, written into each record."""
        self.room = asyncio.Event()
        """Set when the replayer freed space in the spool."""
        self.replay_wake = asyncio.Event()
        self.shadows: dict[int, asyncio.Future[Any]] = {}
        """Batch id -> the delivery of a direct send of that batch, still in the producer:
        the replayer waits for it instead of sending the batch again."""
        self._batch_ids = itertools.count(secrets.randbits(62))
        self.records = 0
        """Records in the spool now."""
        self.events = 0
        """Events in the spool now (a predecessor's included)."""
        self.disk_bytes = 0
        self.left = 0
        """Events left in the spool by close."""

    @property
    def spooling(self) -> bool:
        return self.route is not Route.DIRECT

    # -- opening and closing --------------------------------------------------------

    async def open(self) -> None:
        """Open (and lock) the spool; count what a predecessor left there."""
        config = self.config
        spool = await asyncio.to_thread(
            Spool, config.directory, config.max_bytes, fsync=config.fsync
        )
        self.spool = spool
        self.records = len(spool)
        self.events = await asyncio.to_thread(count_events, spool)
        self.disk_bytes = spool.disk_bytes

    def replay_leftovers(self) -> None:
        """A predecessor's batches go out before anything recorded now."""
        if not self.records:
            return
        self.route = Route.SPOOL
        log.warning(
            "replaying %d event(s) (%d bytes) that an earlier run left in the spool %s "
            "before anything recorded now",
            self.events,
            self.disk_bytes,
            self.config.directory,
        )

    async def close(self) -> None:
        spool, self.spool = self.spool, None
        if spool is None:
            return
        self.left = self.events if len(spool) else 0
        self.disk_bytes = spool.disk_bytes
        await asyncio.to_thread(spool.close)
        if self.config.directory_is_default and not self.left:
            # An empty spool removes its own directory; tidy the default layout's parents
            # (<data_dir>/spool/<topic>) too when nothing else lives there.
            for parent in (self.config.directory.parent, self.config.directory.parent.parent):
                try:
                    parent.rmdir()
                except OSError:
                    break

    async def op(self, fn: Callable[[], _T]) -> _T:
        """Run a spool call in a worker thread: the event loop never waits for a disk."""
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Let it finish: the spool must not be closed under a running call.
            with contextlib.suppress(Exception):
                await future
            raise

    # -- switching ----------------------------------------------------------------------

    def begin(self, reason: str, failed: Batch | None = None, *, renew: bool = True) -> None:
        """From now on batches go to the spool, starting with those Kafka has not acked.

        `renew`: Kafka is presumed gone. The producer is abandoned (the replayer makes a
        new one once Kafka accepts connections), so nothing waits inside the Kafka client
        meanwhile: aiokafka would retry those messages in a tight loop while partitions
        have no leader, and after an outage its idempotence state is often refused.
        """
        if self.spool is None:
            return
        items = self._sender.take_unacked(failed, keep_originals=not renew)
        if renew:
            self.abandon_producer()
        self._sender.requeue(items)
        was = self.route
        self.route = Route.SPOOL
        if was is Route.DIRECT:
            log.warning(
                "Kafka at %s is not taking messages for %s (%s): spooling batches to %s "
                "and replaying them once it answers",
                self._bootstrap,
                self._ledger.topic,
                reason,
                self.config.directory,
            )

    def diverting(self) -> bool:
        if self.route is Route.SPOOL_DRAINED and self.records == 0 and not self._link.broken:
            self.route = Route.DIRECT
            self._ledger.spool_full = False
            log.warning(
                "Kafka at %s answers again and the spool is empty: sending directly",
                self._bootstrap,
            )
        return self.route is not Route.DIRECT

    def abandon_producer(self) -> None:
        """Abandon the producer (what it holds is in the spool); the replayer makes another."""
        # Their deliveries belong to the abandoned producer: the spool sends copies.
        for original in self.shadows.values():
            original.add_done_callback(retrieve)
        self.shadows.clear()
        self._link.drop()

    # -- writing --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Write the batches at the head of the sender's line to the spool, as many as
        fit in one append; when none fit, wait (at most a second) for room."""
        spool = self.spool
        assert spool is not None
        items = self._take_head()
        if not items:
            return
        ids = [next(self._batch_ids) for _ in items]
        records = [
            encode_spooled(i, self.partitions, item.batch)
            for i, item in zip(ids, items, strict=True)
        ]
        written = len(items) if await self.op(functools.partial(spool.append, records)) else 0
        if not written and len(items) > 1:
            # Nearly full: the oldest batches first, as many as still fit.
            for record in records:
                if not await self.op(functools.partial(spool.append, [record])):
                    break
                written += 1
        ledger = self._ledger
        for batch_id, item in zip(ids[:written], items[:written], strict=True):
            self._sender.pending.popleft()
            original = item.original
            if original is not None and (not original.done() or future_error(original) is None):
                self.shadows[batch_id] = original
            count = item.batch.count
            ledger.unacked -= count
            ledger.spooled += count
            self.events += count
        self.records = len(spool)
        self.disk_bytes = spool.disk_bytes
        if written:
            ledger.spool_full = False
            self.replay_wake.set()
            ledger.after_settle()
            return
        self._report_full(spool)
        self.room.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.room.wait()

    def _take_head(self) -> list[Outgoing]:
        """The batches to spool next, still in the sender's line; empty when the first
        was acknowledged by an earlier send after all (then settled and removed)."""
        pending = self._sender.pending
        items: list[Outgoing] = []
        size = 0
        for item in pending:
            original = item.original
            if original is not None and original.done() and future_error(original) is None:
                # Kafka acknowledged the earlier send after all: nothing to spool.
                if not items:
                    pending.popleft()
                    self._ledger.settle(item.batch, None)
                break
            items.append(item)
            value = item.batch.value
            size += len(value) if value is not None else sum(len(e) for e in item.batch.events)
            if len(items) >= _DRAIN_BATCHES or size >= _DRAIN_BYTES:
                break
        return items

    def _report_full(self, spool: Spool) -> None:
        ledger = self._ledger
        if ledger.spool_full:
            return
        ledger.spool_full = True
        log.error(
            "the spool %s is full (%d of %d bytes) and Kafka at %s is still not taking "
            "messages: %s",
            self.config.directory,
            spool.disk_bytes,
            self.config.max_bytes,
            self._bootstrap,
            "record() waits (policy block)"
            if self.config.full_policy == "block"
            else "record() raises SpoolFullError (policy reject)",
        )
        # Wake waiting record() calls: with `reject` they must raise now.
        ledger.room.set()

    async def ack(self, position: SpoolPosition, events: int) -> None:
        """Kafka acknowledged every record up to `position`, holding `events` events."""
        spool = self.spool
        assert spool is not None
        await self.op(functools.partial(spool.ack, position))
        self.records = len(spool)
        self.disk_bytes = spool.disk_bytes
        self.events = max(self.events - events, 0)
        ledger = self._ledger
        ledger.replayed += events
        ledger.acked += events
        self.room.set()
        if self.records == 0:
            self.events = 0
            if self.route is Route.SPOOL:
                self.route = Route.SPOOL_DRAINED
            self._sender.wake()
            log.info(
                "the spool %s is drained (%d events replayed)",
                self.config.directory,
                ledger.replayed,
            )

    async def watchdog(self) -> None:
        """Task: fsync a `batch` spool when due; spool once Kafka is silent for too long."""
        spool = self.spool
        assert spool is not None
        loop = asyncio.get_running_loop()
        unreachable_s = self.config.unreachable_s
        period = min(0.25, unreachable_s / 4)
        while True:
            await asyncio.sleep(period)
            if spool.dirty:
                await self.op(spool.sync_if_due)
            if self.spooling:
                continue
            oldest = self._sender.oldest_unacked()
            if oldest is not None and loop.time() - oldest >= unreachable_s:
                self.begin(f"no acknowledgement for {loop.time() - oldest:.1f}s")
