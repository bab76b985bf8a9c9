"""Sending: one task hands sealed batches to the producer in the order they were sealed,
and tracks each until Kafka acknowledges it.

One sender keeps messages in order: a partition's batches reach Kafka (or the spool) in
recording order. While a `Diversion` (the spool) is active, batches go there instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from typing import Any, Protocol

from producers.batches import Batch, InFlight, Message, Outgoing, message
from producers.kafka_edge import Fault, KafkaProducer, Link, classify, future_error, retrieve
from producers.ledger import Ledger

log = logging.getLogger("producers.gateway")


class Diversion(Protocol):
    """Where batches go while Kafka does not take them (the spool)."""

    def diverting(self) -> bool:
        """Whether the next batch must go to the diversion instead of to Kafka."""
        ...

    async def drain(self) -> None:
        """Move batches from the head of `Sender.pending` to the diversion."""
        ...

    def begin(self, reason: str, failed: Batch | None = None, *, renew: bool = True) -> None:
        """From now on batches go to the diversion, starting with those not acknowledged."""
        ...


async def send_batch(
    producer: KafkaProducer, topic: str, batch: Batch, msg: Message
) -> asyncio.Future[Any]:
    """Hand `batch`, as `msg`, to the producer: at its partition, or by key (None)."""
    return await producer.send(
        topic, msg.value, key=batch.key, partition=batch.partition, headers=msg.headers
    )


class Sender:
    def __init__(self, ledger: Ledger, link: Link, topic: str) -> None:
        self._ledger = ledger
        self._link = link
        self._topic = topic
        self.diversion: Diversion | None = None
        """Set once, before the sender runs, when the spool is on."""
        self.pending: deque[Outgoing] = deque()
        """Batches waiting for the sender, oldest first."""
        self._pending_wake = asyncio.Event()
        # Direct sends awaiting their acknowledgement, in the order they were sent.
        self._inflight: dict[asyncio.Future[Any], InFlight] = {}
        self._sending: Batch | None = None
        self._sending_since = 0.0
        self._send_task: asyncio.Future[asyncio.Future[Any]] | None = None
        self._sending_superseded = False

    def enqueue(self, batch: Batch) -> None:
        self.pending.append(Outgoing(batch))
        self._pending_wake.set()

    def wake(self) -> None:
        self._pending_wake.set()

    async def run(self) -> None:
        """Task: send each pending batch, or divert it."""
        while True:
            if not self.pending:
                self._pending_wake.clear()
                await self._pending_wake.wait()
                continue
            diversion = self.diversion
            if diversion is not None and diversion.diverting():
                await diversion.drain()
                continue
            await self._send_direct(self.pending.popleft().batch)

    async def _send_direct(self, batch: Batch) -> None:
        producer = self._link.producer
        assert producer is not None
        loop = asyncio.get_running_loop()
        msg = message(batch)
        send = asyncio.ensure_future(send_batch(producer, self._topic, batch, msg))
        self._sending, self._sending_since, self._send_task = batch, loop.time(), send
        self._sending_superseded = False
        try:
            await asyncio.wait([send])
        except asyncio.CancelledError:
            # Cancelling aiokafka's send() withdraws the message; keep the batch listed as
            # not safe so that close() reports it.
            send.cancel()
            if not self._sending_superseded:
                self.pending.appendleft(Outgoing(batch))
            raise
        finally:
            self._sending, self._send_task = None, None
        if self._sending_superseded:
            # The watchdog moved this batch to the spool while send() hung; if send()
            # got through after all, Kafka sees it twice, which is harmless.
            if future_error(send) is None:
                send.result().add_done_callback(retrieve)
            return
        error = future_error(send)
        if error is not None:
            self._direct_failed(batch, error)
            return
        future = send.result()
        future.add_done_callback(retrieve)
        self._ledger.messages += 1
        self._ledger.bytes_sent += len(msg.value)
        self._inflight[future] = InFlight(batch, self._sending_since)
        future.add_done_callback(functools.partial(self._delivered, batch))

    def _delivered(self, batch: Batch, future: asyncio.Future[Any]) -> None:
        if future not in self._inflight:
            return  # moved to the spool meanwhile; the replayer looks at this future
        error = future_error(future)
        if error is None or self.diversion is None or classify(error) is Fault.MESSAGE:
            del self._inflight[future]
            self._ledger.settle(batch, error)
            return
        # Still listed in _inflight, so it goes to the spool in its place in line.
        self.diversion.begin(f"{type(error).__name__}: {error}")

    def _direct_failed(self, batch: Batch, error: BaseException) -> None:
        if self.diversion is None or classify(error) is Fault.MESSAGE:
            self._ledger.settle(batch, error)
            return
        self.diversion.begin(f"{type(error).__name__}: {error}", failed=batch)

    def oldest_unacked(self) -> float | None:
        """When the oldest batch the producer has not acknowledged was sent; None: none."""
        for sent in self._inflight.values():
            return sent.since
        if self._sending is not None:
            return self._sending_since
        return None

    def take_unacked(self, failed: Batch | None, *, keep_originals: bool) -> list[Outgoing]:
        """Every batch sent and not acknowledged, oldest first (`failed` after those in
        flight), taken from the sender's tracking; the caller requeues them.

        `keep_originals`: the producer stays, so a delivery still pending (or already
        acknowledged) is kept with its batch, which is then only sent again if it fails.
        """
        items: list[Outgoing] = []
        for future, sent in self._inflight.items():
            keep = keep_originals and (not future.done() or future_error(future) is None)
            items.append(Outgoing(sent.batch, future if keep else None))
        self._inflight.clear()
        if failed is not None:
            items.append(Outgoing(failed))
        if self._sending is not None and not self._sending_superseded:
            send = self._send_task
            original = None
            if send is not None and send.done() and future_error(send) is None:
                original = send.result() if keep_originals else None
            elif send is not None:
                send.cancel()
            items.append(Outgoing(self._sending, original))
            self._sending_superseded = True
        return items

    def requeue(self, items: list[Outgoing]) -> None:
        """Put `items` back at the head of the line, in their order."""
        self.pending.extendleft(reversed(items))
        self._pending_wake.set()

    def unsent_events(self) -> list[bytes]:
        """Events of batches waiting or not acknowledged (for close's report)."""
        events = [e for item in self.pending for e in item.batch.events]
        events += [e for sent in self._inflight.values() for e in sent.batch.events]
        return events
