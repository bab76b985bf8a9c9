"""The gateway library: record events, and they reach Kafka batched, in order, once.

Events are buffered per partition, the one Kafka's default partitioner picks for
key = subject (CONTRACT §1), and each buffer goes out as one batch message with an
explicit partition, so a batch only ever holds events of its own partition. The
producer is idempotent (acks=all), so broker-side retries never duplicate a
message; consumers deduplicate re-sent events by (source, id).

    async with Gateway("127.0.0.1:9092", "tally.events") as gateway:
        await gateway.record(events.request("acct-1", "gw-eu-1", units=2))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn, Protocol, Self

from aiokafka.codec import has_lz4

from producers.events import AnyEvent, encode_event
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from schemas.events import CONTENT_TYPE_BATCH, CONTENT_TYPE_SINGLE

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

_SINGLE_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_SINGLE.encode())]
_BATCH_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_BATCH.encode())]

# aiokafka 0.14 compresses lz4 only when `cramjam` is installed; without it asking
# for lz4 fails at construction, so fall back to sending uncompressed.
COMPRESSION: Final[str | None] = "lz4" if has_lz4() else None


class KafkaProducer(Protocol):
    """The part of aiokafka's AIOKafkaProducer the gateway uses (tests inject fakes)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]: ...


ProducerFactory = Callable[[], KafkaProducer]
"""Builds the producer; called inside the running event loop by `Gateway.start`."""


@dataclass(frozen=True, slots=True)
class GatewayStats:
    events_recorded: int
    """Events accepted by `record` and `send_single`."""
    messages_sent: int
    """Kafka messages handed to the producer (a batch counts once)."""
    events_acked: int
    """Events in messages the broker acknowledged."""
    bytes_sent: int
    """Bytes of message values handed to the producer."""
    events_failed: int = 0
    """Events in messages Kafka refused or timed out on (raised by flush/close)."""
    events_pending: int = 0
    """Events recorded but neither acknowledged nor failed yet."""


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


@dataclass(slots=True)
class _Buffer:
    events: list[bytes] = field(default_factory=list)
    size: int = 0
    """Bytes of the events joined by commas (the brackets excluded)."""
    key: bytes = b""


@dataclass(frozen=True, slots=True)
class _Batch:
    partition: int | None
    """None: Kafka's partitioner places it by key (`send_single`)."""
    key: bytes
    events: list[bytes]


_NEW, _OPEN, _CLOSING, _CLOSED = "new", "open", "closing", "closed"


def kafka_producer_factory(
    bootstrap: str, *, max_message_bytes: int, client_id: str | None = None
) -> ProducerFactory:
    """The real producer: idempotent, acks=all, lz4 when available."""

    def make() -> KafkaProducer:
        from aiokafka import AIOKafkaProducer

        producer: KafkaProducer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            compression_type=COMPRESSION,
            # We batch ourselves; aiokafka only has to pack our messages into record
            # batches, each kept under the broker's message.max.bytes.
            linger_ms=0,
            max_batch_size=max(16_384, max_message_bytes),
            max_request_size=max(1_048_576, max_message_bytes + 65_536),
        )
        return producer

    return make


class Gateway:
    """Batching, partition-aware, backpressured producer of Tally events.

    Explicit arguments override `settings` (default: `ProducerSettings()` from the
    environment). The topic's partition count is read once at start: events are
    placed as Kafka's default partitioner would place them for that count.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        topic: str | None = None,
        *,
        settings: ProducerSettings | None = None,
        max_batch_events: int | None = None,
        linger_ms: float | None = None,
        max_buffered_events: int | None = None,
        max_message_bytes: int | None = None,
        client_id: str | None = None,
        producer_factory: ProducerFactory | None = None,
    ) -> None:
        s = settings if settings is not None else ProducerSettings()
        self.bootstrap: Final = bootstrap if bootstrap is not None else s.bootstrap
        self.topic: Final = topic if topic is not None else s.events_topic
        self._max_batch = _positive(
            "max_batch_events", max_batch_events, s.producer_max_batch_events
        )
        self._max_buffered = _positive(
            "max_buffered_events", max_buffered_events, s.producer_max_buffered_events
        )
        self._max_bytes = _positive(
            "max_message_bytes", max_message_bytes, s.producer_max_message_bytes
        )
        linger = s.producer_linger_ms if linger_ms is None else linger_ms
        if linger < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger}")
        self._linger_s = linger / 1000
        self._factory = producer_factory or kafka_producer_factory(
            self.bootstrap, max_message_bytes=self._max_bytes, client_id=client_id
        )

        self._state = _NEW
        self._producer: KafkaProducer | None = None
        self._partitions = 0
        self._buffers: list[_Buffer] = []
        # Partitions with buffered events -> when the oldest arrived; insertion
        # order is age order, so the linger task only ever looks at the first.
        self._since: dict[int, float] = {}
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue()
        self._inflight: set[asyncio.Future[Any]] = set()
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failures: list[tuple[_Batch, BaseException]] = []

        self._recorded = 0
        self._unacked = 0
        self._messages = 0
        self._acked = 0
        self._failed = 0
        self._bytes = 0

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, and learn the topic's partitions. Called by `async with`."""
        if self._state is not _NEW:
            raise RuntimeError(f"Gateway is {self._state}; a Gateway can be started only once")
        producer = self._factory()
        try:
            await producer.start()
            partitions = await producer.partitions_for(self.topic)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise RuntimeError(
                f"cannot produce to topic {self.topic!r} at {self.bootstrap}: {exc!r}. "
                "Check that the broker is up and the topic exists (`tally up` creates it), "
                "or set TALLY_KAFKA_BOOTSTRAP / TALLY_EVENTS_TOPIC."
            ) from exc
        count = len(partitions or ())
        if count == 0 or set(partitions) != set(range(count)):
            await producer.stop()
            raise RuntimeError(
                f"topic {self.topic!r} at {self.bootstrap} reports partitions "
                f"{sorted(partitions or ())}; expected 0..n-1. Check the topic."
            )
        self._producer = producer
        self._partitions = count
        self._buffers = [_Buffer() for _ in range(count)]
        self._tasks = [
            asyncio.create_task(self._sender(), name=f"tally-gateway-sender-{self.topic}"),
            asyncio.create_task(self._linger(), name=f"tally-gateway-linger-{self.topic}"),
        ]
        self._state = _OPEN

    async def close(self) -> None:
        """Flush, then disconnect. Raises GatewaySendError if anything was not delivered."""
        if self._state in (_CLOSING, _CLOSED):
            return
        if self._state is _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        try:
            await self._flush()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert self._producer is not None
            await self._producer.stop()
            self._state = _CLOSED

    async def flush(self) -> None:
        """Send everything buffered and wait until Kafka acknowledged it all.

        Raises GatewaySendError (once) for every message that failed since the last
        flush; the events in it were not delivered and may be recorded again.
        """
        if self._state is not _OPEN:
            self._refuse()
        await self._flush()

    @property
    def partitions(self) -> int:
        """The topic's partition count, known once started (0 before)."""
        return self._partitions

    @property
    def stats(self) -> GatewayStats:
        return GatewayStats(
            events_recorded=self._recorded,
            messages_sent=self._messages,
            events_acked=self._acked,
            bytes_sent=self._bytes,
            events_failed=self._failed,
            events_pending=self._unacked,
        )

    # -- recording -------------------------------------------------------------

    async def record(self, event: AnyEvent) -> None:
        """Buffer `event` for its account's partition; waits while the buffer is full.

        Raises ValueError for an event too large for any message, RuntimeError when
        the gateway is not open. Delivery failures are raised by `flush`/`close`.
        """
        if self._state is not _OPEN:
            self._refuse()
        while self._unacked >= self._max_buffered:
            await self._wait_for_room()
        data = encode_event(event)
        if len(data) + 2 > self._max_bytes:
            raise ValueError(
                f"event {event.id!r} of {event.subject!r} encodes to {len(data)} bytes, more "
                f"than the largest message ({self._max_bytes} bytes), so it can never be "
                "sent: shorten its labels or raise TALLY_PRODUCER_MAX_MESSAGE_BYTES"
            )
        subject = event.subject
        p = partition_for(subject, self._partitions)
        buf = self._buffers[p]
        if buf.events and buf.size + 1 + len(data) + 2 > self._max_bytes:
            self._seal(p)
            buf = self._buffers[p]
        if not buf.events:
            buf.key = subject.encode()
            buf.size = len(data)
            if not self._since:
                self._wake.set()
            self._since[p] = asyncio.get_running_loop().time()
        else:
            buf.size += 1 + len(data)
        buf.events.append(data)
        self._recorded += 1
        self._unacked += 1
        if len(buf.events) >= self._max_batch:
            self._seal(p)
            # A tight loop of record() never yields otherwise; let the sender run.
            await asyncio.sleep(0)

    async def send_single(self, event: AnyEvent) -> None:
        """Send `event` alone, keyed by subject, placed by Kafka's own partitioner.

        What a minimal gateway in another language does; acknowledged by `flush`.
        """
        if self._state is not _OPEN:
            self._refuse()
        while self._unacked >= self._max_buffered:
            await self._wait_for_room()
        self._recorded += 1
        self._unacked += 1
        self._queue.put_nowait(_Batch(None, event.subject.encode(), [encode_event(event)]))

    # -- internals -------------------------------------------------------------

    def _refuse(self) -> NoReturn:
        if self._state is _NEW:
            raise RuntimeError(
                "Gateway is not started: use `async with Gateway(...) as gw` "
                "or `await gw.start()` first"
            )
        raise RuntimeError(
            f"Gateway is {self._state}: it records nothing more; start a new Gateway to "
            "record more events"
        )

    def _seal(self, p: int) -> None:
        """Hand partition p's buffered events to the sender as one message."""
        buf = self._buffers[p]
        if not buf.events:
            return
        self._queue.put_nowait(_Batch(p, buf.key, buf.events))
        self._buffers[p] = _Buffer()
        self._since.pop(p, None)

    def _seal_all(self) -> None:
        for p in list(self._since):
            self._seal(p)

    async def _wait_for_room(self) -> None:
        # Buffered events make room only once sent: do not let them wait for linger.
        self._seal_all()
        self._room.clear()
        await self._room.wait()
        if self._state is not _OPEN:
            self._refuse()

    async def _flush(self) -> None:
        self._seal_all()
        await self._queue.join()
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        self._raise_failures()

    async def _linger(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._since:
                self._wake.clear()
                await self._wake.wait()
                continue
            p, oldest = next(iter(self._since.items()))
            delay = oldest + self._linger_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self._seal(p)

    async def _sender(self) -> None:
        # One sender keeps messages in the order they were sealed: a partition's
        # batches reach Kafka in recording order.
        while True:
            batch = await self._queue.get()
            try:
                await self._send(batch)
            finally:
                self._queue.task_done()

    async def _send(self, batch: _Batch) -> None:
        assert self._producer is not None
        if len(batch.events) == 1:
            value, headers = batch.events[0], _SINGLE_HEADERS
        else:
            value, headers = b"[" + b",".join(batch.events) + b"]", _BATCH_HEADERS
        try:
            future = await self._producer.send(
                self.topic, value, key=batch.key, partition=batch.partition, headers=headers
            )
        except Exception as exc:
            self._settle(batch, exc)
            return
        self._messages += 1
        self._bytes += len(value)
        self._inflight.add(future)
        future.add_done_callback(functools.partial(self._delivered, batch))

    def _delivered(self, batch: _Batch, future: asyncio.Future[Any]) -> None:
        self._inflight.discard(future)
        if future.cancelled():
            self._settle(batch, asyncio.CancelledError("the delivery was cancelled"))
        else:
            self._settle(batch, future.exception())

    def _settle(self, batch: _Batch, error: BaseException | None) -> None:
        count = len(batch.events)
        self._unacked -= count
        if error is None:
            self._acked += count
        else:
            self._failed += count
            self._failures.append((batch, error))
            where = "by key" if batch.partition is None else f"partition {batch.partition}"
            log.error(
                "Kafka did not acknowledge a message of %d event(s) to %s (%s): %r",
                count,
                self.topic,
                where,
                error,
            )
        if self._unacked < self._max_buffered:
            self._room.set()

    def _raise_failures(self) -> None:
        if not self._failures:
            return
        failures, self._failures = self._failures, []
        events = tuple(e for batch, _ in failures for e in batch.events)
        causes = tuple(error for _, error in failures)
        first = causes[0]
        raise GatewaySendError(
            f"Kafka did not acknowledge {len(failures)} message(s) holding {len(events)} "
            f"event(s) for topic {self.topic!r} at {self.bootstrap} (first error: "
            f"{type(first).__name__}: {first}); those events were NOT delivered. Check the "
            "broker and the topic, then record them again (error.failed_events; a re-sent "
            "event is counted once).",
            events,
            causes,
        ) from first


def _positive(name: str, value: int | None, default: int) -> int:
    chosen = default if value is None else value
    if chosen < 1:
        raise ValueError(f"{name} must be at least 1, got {chosen}")
    return chosen
