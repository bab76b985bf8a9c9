"""Replay: the spool goes back to Kafka, oldest first, a window of records at a time, and
a record leaves the spool only once Kafka acknowledged it.

A batch Kafka refuses for good is set aside next to the spool (`spool_format`); any
other failure abandons the producer, and the replay waits, backing off, until Kafka
accepts a new one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from producers.batches import Batch, message
from producers.kafka_edge import Fault, KafkaProducer, Link, classify, future_error, retrieve
from producers.ledger import Failure, Ledger
from producers.partitioning import partition_for
from producers.sending import send_batch
from producers.spool import SpoolPosition
from producers.spool_format import Spooled, decode_spooled, write_undeliverable
from producers.spooling import Spooler

log = logging.getLogger("producers.gateway")

_REPLAY_RECORDS: Final = 256
_REPLAY_BYTES: Final = 16 * 1024 * 1024
_REPLAY_BACKOFF: Final = (0.05, 2.0)


@dataclass(slots=True)
class _Entry:
    """One spooled record of a window, and the deliveries that carry it."""

    position: SpoolPosition
    spooled: Spooled | None
    """None: not decodable."""
    futures: list[asyncio.Future[Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Outcome:
    delivered: int
    """Entries acknowledged, from the first."""
    broken_at: int | None
    """The first entry not delivered, None: all were."""
    failure: BaseException | None


class Replayer:
    def __init__(self, spooler: Spooler, ledger: Ledger, link: Link, bootstrap: str) -> None:
        self._spooler = spooler
        self._ledger = ledger
        self._link = link
        self._bootstrap = bootstrap
        self._failing = False
        """The last attempt failed (and was logged): Kafka still does not answer."""
        self._window_since: float | None = None

    async def run(self) -> None:
        """Task: replay while the gateway is spooling and the spool holds records."""
        spooler = self._spooler
        backoff = _REPLAY_BACKOFF[0]
        while True:
            if not spooler.spooling or spooler.records == 0:
                spooler.replay_wake.clear()
                await spooler.replay_wake.wait()
                continue
            if self._link.broken and not await self._renew():
                ok = False
            else:
                ok = await self._window()
            if ok:
                backoff = _REPLAY_BACKOFF[0]
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _REPLAY_BACKOFF[1])

    async def _renew(self) -> bool:
        if await self._link.renew(quiet=self._failing):
            return True
        self._failing = True
        return False

    async def wait_drained(self, deadline: float) -> None:
        """While Kafka takes replayed batches and time remains, let the spool drain."""
        spooler = self._spooler
        loop = asyncio.get_running_loop()
        unreachable_s = spooler.config.unreachable_s
        while spooler.spool is not None and spooler.records and loop.time() < deadline:
            since = self._window_since
            stalled = since is not None and loop.time() - since >= unreachable_s
            if self._failing or self._link.broken or stalled:
                return
            await asyncio.sleep(0.02)

    async def _window(self) -> bool:
        """Send the oldest spooled batches, ack what Kafka acknowledged; False: retry later."""
        spooler = self._spooler
        spool = spooler.spool
        assert spool is not None
        producer = self._link.producer
        assert producer is not None
        page = await spooler.op(functools.partial(spool.peek, _REPLAY_RECORDS, _REPLAY_BYTES))
        if not page:
            spooler.records = len(spool)
            return True
        self._window_since = asyncio.get_running_loop().time()
        try:
            entries, failure = await self._send_window(producer, page)
            waiting = [f for entry in entries for f in entry.futures]
            if waiting:
                # As for direct sends: unanswered for unreachable_after_s, Kafka is gone
                # again (the producer is then replaced, which abandons these).
                await asyncio.wait(waiting, timeout=spooler.config.unreachable_s)
        finally:
            self._window_since = None
        outcome = self._outcome(entries, failure)
        if outcome.delivered:
            last = entries[outcome.delivered - 1]
            events = sum(
                len(e.spooled.batch.events)
                for e in entries[: outcome.delivered]
                if e.spooled is not None
            )
            await spooler.ack(last.position, events)
        if outcome.broken_at is None:
            self._failing = False
            return True
        assert outcome.failure is not None
        broken = entries[outcome.broken_at]
        fault = Fault.MESSAGE if broken.spooled is None else classify(outcome.failure)
        if fault is Fault.MESSAGE:
            raw = page[outcome.broken_at][1]
            await self._set_aside(broken.position, broken.spooled, raw, outcome.failure)
            return True
        spooler.abandon_producer()
        if not self._failing:
            log.warning(
                "replaying the spool %s: Kafka at %s did not take a message (%s: %s); "
                "retrying until it does",
                spooler.config.directory,
                self._bootstrap,
                type(outcome.failure).__name__,
                outcome.failure,
            )
        self._failing = True
        return False

    async def _send_window(
        self, producer: KafkaProducer, page: list[tuple[SpoolPosition, bytes]]
    ) -> tuple[list[_Entry], BaseException | None]:
        """Hand the page's batches to the producer, in order, until one cannot be."""
        entries: list[_Entry] = []
        for position, data in page:
            try:
                spooled = decode_spooled(data)
            except ValueError as exc:
                entries.append(_Entry(position, None))
                return entries, exc
            entry = _Entry(position, spooled)
            entries.append(entry)
            original = self._spooler.shadows.pop(spooled.batch_id, None)
            if original is not None and (not original.done() or future_error(original) is None):
                entry.futures.append(original)
                continue
            for batch in self._placed(spooled):
                msg = message(batch)
                try:
                    future = await send_batch(producer, self._ledger.topic, batch, msg)
                except Exception as exc:
                    return entries, exc
                future.add_done_callback(retrieve)
                self._ledger.messages += 1
                self._ledger.bytes_sent += len(msg.value)
                entry.futures.append(future)
        return entries, None

    def _outcome(self, entries: list[_Entry], failure: BaseException | None) -> _Outcome:
        """How far the window got: the acknowledged entries, then the first that was not
        (`failure`: what stopped the sending, charged to the last entry)."""
        for index, entry in enumerate(entries):
            if not all(f.done() for f in entry.futures):
                timeout = self._spooler.config.unreachable_s
                return _Outcome(
                    index, index, TimeoutError(f"no acknowledgement for {timeout:.1f}s")
                )
            errors = [e for e in map(future_error, entry.futures) if e is not None]
            last = index == len(entries) - 1
            if errors or (last and failure is not None):
                return _Outcome(index, index, errors[0] if errors else failure)
        return _Outcome(len(entries), None, None)

    def _placed(self, spooled: Spooled) -> list[Batch]:
        batch = spooled.batch
        partitions = self._spooler.partitions
        if batch.partition is None or spooled.partitions == partitions:
            return [batch]
        # The topic's partition count changed since this was spooled: place its events
        # as record() places them now, so each account stays in one partition.
        groups: dict[int, Batch] = {}
        for event in batch.events:
            subject = str(orjson.loads(event)["subject"])
            p = partition_for(subject, partitions)
            groups.setdefault(p, Batch(p, subject.encode(), [])).events.append(event)
        return list(groups.values())

    async def _set_aside(
        self,
        position: SpoolPosition,
        spooled: Spooled | None,
        raw: bytes,
        error: BaseException,
    ) -> None:
        """A spooled batch Kafka refuses for good: keep it next to the spool, move on."""
        spooler = self._spooler
        target = await spooler.op(
            functools.partial(write_undeliverable, spooler.config.directory, position, spooled, raw)
        )
        count = len(spooled.batch.events) if spooled is not None else 0
        log.error(
            "Kafka at %s refuses a spooled message of %d event(s) for good (%s: %s); it was "
            "moved to %s. Fix the cause and record those events again (a re-sent event is "
            "counted once).",
            self._bootstrap,
            count,
            type(error).__name__,
            error,
            target,
        )
        ledger = self._ledger
        if spooled is not None:
            ledger.failed += count
            ledger.failures.append(Failure(spooled.batch, error))
        await spooler.ack(position, count)
        ledger.replayed -= count
        ledger.acked -= count
