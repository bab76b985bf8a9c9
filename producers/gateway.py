"""The gateway library: record events, and they reach Kafka batched, in order, at least once.

Events are buffered per partition, the one Kafka's default partitioner picks for
key = subject (CONTRACT §1), and each buffer goes out as one batch message with an
explicit partition, so a batch only ever holds events of its own partition. The
producer is idempotent (acks=all), so broker-side retries never duplicate a
message; consumers deduplicate re-sent events by (source, id).

    async with Gateway("127.0.0.1:9092", "tally.events") as gateway:
        await gateway.record(events.request("acct-1", "gw-eu-1", units=2))

Durability. Metering is billing: an event lost is revenue lost, a duplicate is counted
once. When Kafka leaves a message unacknowledged for `unreachable_after_s`, or fails it
with a connection-type error, the gateway starts *spooling*: the messages not yet
acknowledged, then every new batch, are appended to a bounded disk queue
(`producers.spool`, one directory per gateway process) instead of piling up in memory.
A replay task sends the spool, oldest first, as soon as Kafka answers, and removes
records only once the broker acknowledged them; when the spool is empty, batches go
straight to Kafka again. Per partition, batches keep their recording order through all
of this, except when Kafka fails a message while later ones got through: it is sent again
after them. A gateway started on a spool that a crashed predecessor left behind replays
it first. The producer that stopped answering is abandoned, and a new one made once Kafka
accepts connections, so nothing waits inside the Kafka client during an outage (aiokafka
would retry it in a tight loop while partitions have no leader, and often comes back
with an idempotence state the broker refuses). A message it had in flight may have
reached Kafka all the same: it then arrives twice, and is counted once.

An event is *safe* once Kafka acknowledged it or it is in the spool (fsync'd, with the
default `TALLY_PRODUCER_SPOOL_FSYNC=always`). `flush()` and `close()` wait, within a
timeout, until every recorded event is safe, and return how many events remain in the
spool. Until then an event lives in memory only, and a SIGKILL loses it: at most
`max_buffered_events`, in practice the last linger period, or while Kafka is silent the
last `unreachable_after_s` of traffic. When the spool is full, `record` waits (policy
`block`) or raises SpoolFullError (policy `reject`).

Shutdown: `install_signal_handlers(gateway)` flushes and closes the gateway on SIGTERM and
SIGINT (see there). Without it, a SIGTERM kills the process with the buffers unflushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import secrets
import signal
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Protocol, Self, TypeVar

import orjson
from aiokafka import errors as kafka_errors

from producers.events import (
    MAX_PLAIN_EVENT_BYTES,
    PLAIN_EVENT_TYPES,
    AnyEvent,
    batch_encoder,
    encode_event,
    encode_events,
)
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from producers.spool import FsyncPolicy, Spool, SpoolPosition
from schemas.events import CONTENT_TYPE_BATCH, CONTENT_TYPE_SINGLE
from schemas.kafka import BROKER_MESSAGE_MAX_BYTES, COMPRESSION, REQUEST_OVERHEAD_BYTES

if TYPE_CHECKING:
    from tally_fold import BatchEncoder

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
SpoolFullPolicy = Literal["block", "reject"]

_SINGLE_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_SINGLE.encode())]
_BATCH_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_BATCH.encode())]

_T = TypeVar("_T")


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
"""Builds a producer; called inside the running event loop by `Gateway.start`, and again
whenever the gateway replaces a producer whose state Kafka no longer accepts."""


@dataclass(frozen=True, slots=True)
class GatewayStats:
    events_recorded: int
    """Events accepted by `record` and `send_single`."""
    messages_sent: int
    """Kafka messages handed to the producer (a batch counts once; replays count again)."""
    events_acked: int
    """Events in messages the broker acknowledged, replayed ones included."""
    bytes_sent: int
    """Bytes of message values handed to the producer."""
    events_failed: int = 0
    """Events in messages Kafka refused for good (raised by flush/close)."""
    events_pending: int = 0
    """Events recorded but not yet safe: neither acknowledged, failed nor spooled."""
    events_spooled: int = 0
    """Events written to the spool (since start)."""
    events_replayed: int = 0
    """Events from the spool that the broker acknowledged (since start)."""
    events_in_spool: int = 0
    """Events in the spool now, waiting for Kafka (a predecessor's included)."""
    spool_bytes: int = 0
    """Size of the spool on disk now."""
    events_rejected_spool_full: int = 0
    """`record` calls refused with SpoolFullError (policy `reject`)."""


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


@dataclass(slots=True)
class _Buffer:
    events: list[bytes] = field(default_factory=list)
    size: int = 0
    """Bytes of the events joined by commas (the brackets excluded)."""
    key: bytes = b""
    models: list[AnyEvent] = field(default_factory=list)
    """Events not encoded yet (deferred mode: encoded as one array when sealed)."""


class _Batch:
    """One message's events: encoded one by one, or as the whole message `value`."""

    __slots__ = ("_events", "count_hint", "key", "partition", "value")

    def __init__(
        self,
        partition: int | None,
        key: bytes,
        events: list[bytes] | None = None,
        *,
        value: bytes | None = None,
        count: int = 0,
    ) -> None:
        self.partition = partition
        """None: Kafka's partitioner places it by key (`send_single`)."""
        self.key = key
        self._events = events
        self.value = value
        """The batch message, encoded in one go; None: join `events`."""
        self.count_hint = count

    @property
    def events(self) -> list[bytes]:
        """Each event's JSON, as the spool and GatewaySendError hold them."""
        if self._events is None:
            # Only off the hot path (spooling, failures): an orjson round trip gives back
            # each element's bytes exactly as they are in `value`.
            assert self.value is not None
            self._events = [orjson.dumps(doc) for doc in orjson.loads(self.value)]
        return self._events

    @property
    def count(self) -> int:
        return len(self._events) if self._events is not None else self.count_hint


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A batch waiting for the sender."""

    batch: _Batch
    original: asyncio.Future[Any] | None = None
    """The delivery of an earlier direct send of this very batch, still in the producer:
    the spooled copy is only sent again if that one fails."""


@dataclass(frozen=True, slots=True)
class _InFlight:
    batch: _Batch
    since: float


class _Fault(Enum):
    RETRY = "Kafka is unreachable, or no longer accepts this producer"
    MESSAGE = "the message can never be delivered"


# Kafka rejects the producer's sequence/epoch after an outage (e.g. a batch that expired
# with sequence numbers assigned): these are cured by a new producer, not by waiting.
_PRODUCER_FAULTS: Final = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.ProducerFenced,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.ProducerClosed,
    kafka_errors.IllegalStateError,
)
_RETRY_ERRORS: Final = (
    *_PRODUCER_FAULTS,
    OSError,
    TimeoutError,
    asyncio.CancelledError,
    kafka_errors.KafkaTimeoutError,
)


def _classify(error: BaseException) -> _Fault:
    """RETRY: spool the message and send it again through a new producer."""
    if isinstance(error, _RETRY_ERRORS):
        return _Fault.RETRY
    if isinstance(error, kafka_errors.KafkaError) and (
        error.retriable or type(error) is kafka_errors.KafkaError
    ):
        # A bare KafkaError is what aiokafka's dead sender task leaves behind.
        return _Fault.RETRY
    return _Fault.MESSAGE


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Deliveries the gateway gave up on (their batch is in the spool) would otherwise
    # each log "Future exception was never retrieved".
    if not future.cancelled():
        future.exception()


_NEW, _OPEN, _CLOSING, _CLOSED = "new", "open", "closing", "closed"

# One spool record per batch: format, batch id, the topic's partition count when it was
# spooled, partition (-1: by key), key length, event count; then the key, then each event
# as u32 length + bytes.
_SPOOL_FORMAT: Final = 1
_PLACEMENT_CACHE: Final = 1 << 18
_RECORD_HEAD: Final = struct.Struct("<BQiiHI")
_EVENT_LENGTH: Final = struct.Struct("<I")
_REPLAY_RECORDS: Final = 256
_REPLAY_BYTES: Final = 16 * 1024 * 1024
_REPLAY_BACKOFF: Final = (0.05, 2.0)
_UNDELIVERABLE: Final = "undeliverable.jsonl"


@dataclass(frozen=True, slots=True)
class _Spooled:
    batch_id: int
    partitions: int
    batch: _Batch


def _encode_spooled(batch_id: int, partitions: int, batch: _Batch) -> bytes:
    partition = -1 if batch.partition is None else batch.partition
    parts = [
        _RECORD_HEAD.pack(
            _SPOOL_FORMAT, batch_id, partitions, partition, len(batch.key), len(batch.events)
        ),
        batch.key,
    ]
    for event in batch.events:
        parts.append(_EVENT_LENGTH.pack(len(event)))
        parts.append(event)
    return b"".join(parts)


def _decode_spooled(data: bytes) -> _Spooled:
    try:
        version, batch_id, partitions, partition, key_length, count = _RECORD_HEAD.unpack_from(data)
        if version != _SPOOL_FORMAT:
            raise ValueError(f"spool record format {version}, expected {_SPOOL_FORMAT}")
        at = _RECORD_HEAD.size
        key = data[at : at + key_length]
        at += key_length
        events: list[bytes] = []
        for _ in range(count):
            (length,) = _EVENT_LENGTH.unpack_from(data, at)
            at += _EVENT_LENGTH.size
            events.append(data[at : at + length])
            at += length
    except struct.error as exc:
        raise ValueError(f"truncated spool record: {exc}") from exc
    if at != len(data) or not events:
        raise ValueError("malformed spool record")
    return _Spooled(batch_id, partitions, _Batch(None if partition < 0 else partition, key, events))


def _spooled_events(data: bytes) -> int:
    try:
        version, _, _, _, _, count = _RECORD_HEAD.unpack_from(data)
    except struct.error:
        return 0
    return int(count) if version == _SPOOL_FORMAT else 0


def _message(batch: _Batch) -> tuple[bytes, Headers]:
    if batch.value is not None:
        return batch.value, _BATCH_HEADERS
    if len(batch.events) == 1:
        return batch.events[0], _SINGLE_HEADERS
    return b"[" + b",".join(batch.events) + b"]", _BATCH_HEADERS


def _future_error(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError("the delivery was cancelled")
    return future.exception()


def default_spool_dir(data_dir: Path, topic: str, client_id: str | None) -> Path:
    """`<data_dir>/spool/<topic>/<client_id or 'gateway'>`, made safe as a file name."""

    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"

    return (data_dir / "spool" / safe(topic) / safe(client_id or "gateway")).absolute()


def kafka_producer_factory(
    bootstrap: str, *, max_message_bytes: int, client_id: str | None = None
) -> ProducerFactory:
    """The real producer: idempotent, acks=all, snappy when available."""

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
            max_request_size=max(
                BROKER_MESSAGE_MAX_BYTES, max_message_bytes + REQUEST_OVERHEAD_BYTES
            ),
        )
        return producer

    return make


class Gateway:
    """Batching, partition-aware, backpressured, spooling producer of Tally events.

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
        spool: bool | None = None,
        spool_dir: Path | str | None = None,
        spool_max_bytes: int | None = None,
        spool_full_policy: SpoolFullPolicy | None = None,
        spool_fsync: FsyncPolicy | None = None,
        unreachable_after_s: float | None = None,
        close_timeout_s: float | None = None,
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
        # A record() waiting for room resumes once a quarter of the buffer is free, not
        # at the first acknowledgement: each wait may seal partial buffers, and waits
        # one message apart would send a stream of tiny messages (the Kafka client's cost
        # is mostly per message), slowing the acknowledgements that make room: in the
        # bench, up to 200k messages of ~5 events instead of 5k of 200.
        self._resume_at = self._max_buffered - max(1, self._max_buffered // 4)
        linger = s.producer_linger_ms if linger_ms is None else linger_ms
        if linger < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger}")
        self._linger_s = linger / 1000
        self._factory = producer_factory or kafka_producer_factory(
            self.bootstrap, max_message_bytes=self._max_bytes, client_id=client_id
        )
        self._unreachable_s = _seconds(
            "unreachable_after_s", unreachable_after_s, s.producer_unreachable_after_s
        )
        self._close_timeout = _seconds(
            "close_timeout_s", close_timeout_s, s.producer_close_timeout_s
        )
        enabled = s.producer_spool if spool is None else spool
        chosen_dir = spool_dir if spool_dir is not None else s.producer_spool_dir
        self.spool_dir: Final[Path | None] = (
            None
            if not enabled
            else Path(chosen_dir).absolute()
            if chosen_dir is not None
            else default_spool_dir(s.data_dir, self.topic, client_id)
        )
        """Where batches wait while Kafka is unreachable; None: spooling is off."""
        self._spool_dir_is_default = enabled and chosen_dir is None
        self._spool_max = (
            spool_max_bytes if spool_max_bytes is not None else s.producer_spool_max_bytes
        )
        if enabled and self._spool_max < 2 * self._max_bytes + 65_536:
            raise ValueError(
                f"spool_max_bytes ({self._spool_max}) must hold at least two of the largest "
                f"messages (max_message_bytes={self._max_bytes}): at least "
                f"{2 * self._max_bytes + 65_536}"
            )
        self._full_policy: SpoolFullPolicy = spool_full_policy or s.producer_spool_full_policy
        if self._full_policy not in ("block", "reject"):
            raise ValueError(
                f"spool_full_policy must be 'block' or 'reject', got {self._full_policy!r}"
            )
        self._spool_fsync: FsyncPolicy = spool_fsync or s.producer_spool_fsync

        self._state = _NEW
        self._producer: KafkaProducer | None = None
        self._partitions = 0
        self._buffers: list[_Buffer] = []
        # Deferred mode: when no plain event can be too large for a message, record()
        # buffers the models and _seal encodes each buffer as one array (a native call,
        # not one per event); otherwise every event is encoded, and measured, as recorded.
        self._deferred = self._max_bytes >= MAX_PLAIN_EVENT_BYTES + 2
        # Native mode (native/ installed): record() writes each event into its partition's
        # message at once (producers.events.batch_encoder), measured exactly, so neither
        # of the two modes above is used.
        self._encoder: BatchEncoder | None = None
        # subject -> partition: one dict lookup instead of murmur2 (pure Python) per event.
        self._placement: dict[str, int] = {}
        # Partitions with buffered events -> when the oldest arrived; insertion
        # order is age order, so the linger task only ever looks at the first.
        self._since: dict[int, float] = {}
        self._pending: deque[_Outgoing] = deque()
        self._pending_wake = asyncio.Event()
        # Direct sends awaiting their acknowledgement, in the order they were sent.
        self._inflight: dict[asyncio.Future[Any], _InFlight] = {}
        self._sending: _Batch | None = None
        self._sending_since = 0.0
        self._send_task: asyncio.Future[asyncio.Future[Any]] | None = None
        self._sending_superseded = False
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._safe_waiters: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._retired: set[asyncio.Task[None]] = set()
        self._failures: list[tuple[_Batch, BaseException]] = []

        self._spool: Spool | None = None
        self._spooling = False
        self._resume_direct = False
        self._spool_full = False
        self._spool_room = asyncio.Event()
        self._replay_wake = asyncio.Event()
        self._replay_failing = False
        self._replay_window_since: float | None = None
        self._producer_broken = False
        self._shadows: dict[int, asyncio.Future[Any]] = {}
        self._batch_ids = itertools.count(secrets.randbits(62))
        self._spool_records = 0
        self._spool_events = 0
        self._spool_bytes = 0
        self._left_in_spool = 0

        self._recorded = 0
        self._unacked = 0
        self._messages = 0
        self._acked = 0
        self._failed = 0
        self._bytes = 0
        self._spooled = 0
        self._replayed = 0
        self._rejected = 0

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
        """Open the spool, connect, learn the topic's partitions. Called by `async with`.

        A spool left non-empty by an earlier process is replayed before anything
        recorded now. Raises SpoolLockedError when another process uses the spool.
        """
        if self._state is not _NEW:
            raise RuntimeError(f"Gateway is {self._state}; a Gateway can be started only once")
        if self.spool_dir is not None:
            spool = await asyncio.to_thread(
                Spool, self.spool_dir, self._spool_max, fsync=self._spool_fsync
            )
            self._spool = spool
            self._spool_records = len(spool)
            self._spool_events = await asyncio.to_thread(_count_events, spool)
            self._spool_bytes = spool.disk_bytes
        try:
            await self._connect()
        except BaseException:
            if self._spool is not None:
                await asyncio.to_thread(self._spool.close)
                self._spool = None
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._sender(), name=f"tally-gateway-sender-{self.topic}"),
            loop.create_task(self._linger(), name=f"tally-gateway-linger-{self.topic}"),
        ]
        if self._spool is not None:
            self._tasks += [
                loop.create_task(self._watchdog(), name=f"tally-gateway-watchdog-{self.topic}"),
                loop.create_task(self._replayer(), name=f"tally-gateway-replay-{self.topic}"),
            ]
            if self._spool_records:
                self._spooling = True
                log.warning(
                    "replaying %d event(s) (%d bytes) that an earlier run left in the spool %s "
                    "before anything recorded now",
                    self._spool_events,
                    self._spool_bytes,
                    self.spool_dir,
                )
        self._state = _OPEN

    async def _connect(self) -> None:
        producer = self._factory()
        try:
            await producer.start()
            partitions = await producer.partitions_for(self.topic)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            waiting = (
                f" {self._spool_events} spooled event(s) wait in {self.spool_dir} for the "
                "next start."
                if self._spool_events
                else ""
            )
            raise RuntimeError(
                f"cannot produce to topic {self.topic!r} at {self.bootstrap}: {exc!r}. "
                "Check that the broker is up and the topic exists (`tally up` creates it), "
                f"or set TALLY_KAFKA_BOOTSTRAP / TALLY_EVENTS_TOPIC.{waiting}"
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
        self._encoder = batch_encoder(count, self._max_bytes)

    # `timeout` bounds waiting for acknowledgements *and* spooling what is left when it
    # runs out, which an outer asyncio.timeout could only cancel (hence ASYNC109).
    async def close(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Make every recorded event safe, then disconnect; returns the events left spooled.

        Waits up to `timeout` seconds (default `close_timeout_s`) for buffered events to be
        acknowledged by Kafka or written to the spool, then, while Kafka keeps taking
        them, for the spool to drain. What stays in the spool is replayed by the next
        Gateway started on the same spool directory. Raises GatewaySendError for events
        Kafka refused for good, and for events that were neither acknowledged nor spooled
        in time (no spool, or a full one): those may be lost.
        """
        if self._state is _CLOSING:
            # A second caller (a signal handler and `async with`, say) waits for the first.
            await self._closed.wait()
        if self._state is _CLOSED:
            return self._left_in_spool
        if self._state is _NEW:
            self._state = _CLOSED
            self._closed.set()
            return 0
        self._state = _CLOSING
        loop = asyncio.get_running_loop()
        budget = self._close_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        unsafe: list[bytes] = []
        try:
            # Keep a little of the budget to spool what Kafka did not take by then.
            safe = await self._wait_safe(deadline - min(2.0, budget / 4))
            if not safe and self._spool is not None:
                self._begin_spooling("the gateway is closing", renew=False)
                safe = await self._wait_safe(deadline)
            if safe:
                await self._wait_replay(deadline)
        finally:
            await self._stop_tasks()
            unsafe = self._unsafe_events()
            if self._producer is not None:
                await self._stop_producer(
                    self._producer, abandon=self._spooling, timeout=max(deadline - loop.time(), 2.0)
                )
            await self._close_spool()
            self._state = _CLOSED
            self._closed.set()
            # record() calls waiting for room wake up to learn that the gateway closed.
            self._room.set()
        self._report_close(unsafe)
        self._raise_failures(unsafe, budget)
        return self._left_in_spool

    async def flush(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Send everything buffered; wait until each event is acknowledged or spooled.

        Returns the number of events in the spool, waiting for Kafka. Raises
        GatewaySendError (once) for every message Kafka refused for good since the last
        flush; the events in it were not delivered and may be recorded again. Raises
        FlushTimeoutError after `timeout` seconds (default `close_timeout_s`); the events
        are then still buffered and still being sent.
        """
        if self._state is not _OPEN:
            self._refuse()
        loop = asyncio.get_running_loop()
        budget = self._close_timeout if timeout is None else timeout
        if not await self._wait_safe(loop.time() + budget):
            self._raise_failures()
            raise FlushTimeoutError(
                f"{self._unacked} event(s) for topic {self.topic!r} were neither acknowledged "
                f"by Kafka at {self.bootstrap} nor spooled within {budget:.1f}s; they are "
                "still buffered and being sent. Check the broker; with the spool disabled "
                "(TALLY_PRODUCER_SPOOL=false) they wait in memory until Kafka answers.",
                self._unacked,
            )
        self._raise_failures()
        return self._spool_events

    @property
    def partitions(self) -> int:
        """The topic's partition count, known once started (0 before)."""
        return self._partitions

    @property
    def spooling(self) -> bool:
        """Whether batches currently go to the spool (Kafka unreachable, or replaying)."""
        return self._spooling

    @property
    def stats(self) -> GatewayStats:
        return GatewayStats(
            events_recorded=self._recorded,
            messages_sent=self._messages,
            events_acked=self._acked,
            bytes_sent=self._bytes,
            events_failed=self._failed,
            events_pending=self._unacked,
            events_spooled=self._spooled,
            events_replayed=self._replayed,
            events_in_spool=self._spool_events,
            spool_bytes=self._spool_bytes,
            events_rejected_spool_full=self._rejected,
        )

    # -- recording -------------------------------------------------------------

    async def record(self, event: AnyEvent) -> None:
        """Buffer `event` for its account's partition; waits while the buffer is full.

        Raises ValueError for an event too large for any message (or, with the native
        encoder, one built without validation that no JSON can carry), RuntimeError when
        the gateway is not open, SpoolFullError when Kafka is unreachable, the spool is
        full and the policy is `reject`. Delivery failures are raised by `flush`/`close`.
        """
        if self._state is not _OPEN:
            self._refuse()
        if self._spool_full:
            self._maybe_reject(event)
        while self._unacked >= self._max_buffered:
            await self._wait_for_room()
            if self._spool_full:
                self._maybe_reject(event)
        encoder = self._encoder
        if encoder is not None:
            # Places the event as _place does and writes it into that partition's message.
            n = encoder.add(event)
            if 1 < n < self._max_batch:
                self._recorded += 1
                self._unacked += 1
                return
            if self._added(encoder, event, n):
                # A tight loop of record() never yields otherwise; let the sender run.
                await asyncio.sleep(0)
            return
        subject = event.subject
        p = self._placement.get(subject)
        if p is None:
            p = self._place(subject)
        if self._deferred:
            if event.datacontenttype is not None or type(event) not in PLAIN_EVENT_TYPES:
                # Not bounded by MAX_PLAIN_EVENT_BYTES: measure it now, so that an event
                # too large for any message is refused here, not lost at _seal.
                self._check_size(event, encode_event(event))
            models = self._buffers[p].models
            if not models:
                self._buffers[p].key = subject.encode()
                if not self._since:
                    self._wake.set()
                self._since[p] = asyncio.get_running_loop().time()
            models.append(event)
            self._recorded += 1
            self._unacked += 1
            if len(models) >= self._max_batch:
                self._seal(p)
                # A tight loop of record() never yields otherwise; let the sender run.
                await asyncio.sleep(0)
            return
        data = encode_event(event)
        self._check_size(event, data)
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
        if self._spool_full:
            self._maybe_reject(event)
        while self._unacked >= self._max_buffered:
            await self._wait_for_room()
            if self._spool_full:
                self._maybe_reject(event)
        self._recorded += 1
        self._unacked += 1
        self._enqueue(_Batch(None, event.subject.encode(), [encode_event(event)]))

    # -- internals: recording --------------------------------------------------

    def _added(self, encoder: BatchEncoder, event: AnyEvent, n: int) -> bool:
        """record() in native mode, one event in a hundred or so: the encoder took the
        first event of a message (n = 1), filled one, or did not take the event (n <= 0).
        True when it sealed a message."""
        if n > 0:
            p = encoder.last
        else:
            p, n = self._add_slowly(encoder, event, n)
        if n == 1:
            self._buffers[p].key = event.subject.encode()
            if not self._since:
                self._wake.set()
            self._since[p] = asyncio.get_running_loop().time()
        self._recorded += 1
        self._unacked += 1
        if n >= self._max_batch:
            self._seal(p)
            return True
        return False

    def _add_slowly(self, encoder: BatchEncoder, event: AnyEvent, result: int) -> tuple[int, int]:
        """Native mode, when the encoder did not take `event`: seal its partition's full
        message, or write the event as Python does; the partition, and how many events
        its message then holds.

        Python spells some floats longer or shorter, so an event too large for the
        encoder gets a second chance; raises ValueError when it does not fit, or when
        no encoder can write it.
        """
        data: bytes | None = None
        # UNSUPPORTED may come before the encoder placed it (not a plain model, no str
        # subject), so place it as the Python modes do.
        p = (
            encoder.last
            if result != encoder.UNSUPPORTED
            else partition_for(event.subject, self._partitions)
        )
        while True:
            if result == encoder.FULL:
                self._seal(p)
            elif data is None:  # UNSUPPORTED, or TOO_LARGE as the encoder writes it
                try:
                    data = encode_event(event)
                except TypeError as exc:  # orjson.JSONEncodeError
                    raise ValueError(
                        f"event {event.id!r} of {event.subject!r} cannot be written as JSON "
                        f"({exc}), so it was not recorded; build events with "
                        "producers.events, whose models validate them"
                    ) from exc
            else:  # TOO_LARGE as Python writes it too
                self._check_size(event, data)
                raise AssertionError(f"the encoder refused {len(data)} bytes within the bound")
            result = encoder.add(event) if data is None else encoder.add_raw(p, data)
            if result > 0:
                return p, result

    def _check_size(self, event: AnyEvent, data: bytes) -> None:
        if len(data) + 2 > self._max_bytes:
            raise ValueError(
                f"event {event.id!r} of {event.subject!r} encodes to {len(data)} bytes, more "
                f"than the largest message ({self._max_bytes} bytes), so it can never be "
                "sent: shorten its labels or raise TALLY_PRODUCER_MAX_MESSAGE_BYTES"
            )

    def _place(self, subject: str) -> int:
        p = partition_for(subject, self._partitions)
        if len(self._placement) >= _PLACEMENT_CACHE:
            # Bounded memory under a flood of distinct subjects; refilling is cheap.
            self._placement.clear()
        self._placement[subject] = p
        return p

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

    def _maybe_reject(self, event: AnyEvent) -> None:
        if self._full_policy != "reject":
            return
        self._rejected += 1
        raise SpoolFullError(
            f"event {event.id!r} of {event.subject!r} was NOT recorded: Kafka at "
            f"{self.bootstrap} is unreachable and the spool {self.spool_dir} is full "
            f"({self._spool_bytes} of {self._spool_max} bytes). Keep the event and retry "
            "later, or fail the request; TALLY_PRODUCER_SPOOL_MAX_BYTES sets the bound and "
            "TALLY_PRODUCER_SPOOL_FULL_POLICY=block makes record() wait instead.",
            event,
        )

    def _enqueue(self, batch: _Batch) -> None:
        self._pending.append(_Outgoing(batch))
        self._pending_wake.set()

    def _seal(self, p: int) -> None:
        """Hand partition p's buffered events to the sender as one message."""
        buf = self._buffers[p]
        if self._encoder is not None:
            value, count = self._encoder.take(p)
            self._since.pop(p, None)
            if count == 1:  # a lone event goes out as a single event, as in the other modes
                self._enqueue(_Batch(p, buf.key, [value[1:-1]]))
            elif count:
                self._enqueue(_Batch(p, buf.key, value=value, count=count))
            return
        if buf.models:
            self._buffers[p] = _Buffer()
            self._since.pop(p, None)
            for batch in self._encode_models(p, buf.key, buf.models):
                self._enqueue(batch)
            return
        if not buf.events:
            return
        self._enqueue(_Batch(p, buf.key, buf.events))
        self._buffers[p] = _Buffer()
        self._since.pop(p, None)

    def _encode_models(self, p: int, key: bytes, models: list[AnyEvent]) -> list[_Batch]:
        """Deferred mode: one batch message, unless it is too large (or not encodable)."""
        if len(models) > 1:
            try:
                value = encode_events(models)
            except orjson.JSONEncodeError:
                value = b""
            if value and len(value) <= self._max_bytes:
                return [_Batch(p, key, value=value, count=len(models))]
        # Rare: events near the size bound, or not encodable (an int beyond 64 bits, a
        # model built without validation). Pack them one by one, as the exact mode does.
        batches: list[_Batch] = []
        current: list[bytes] = []
        size = 0
        for model in models:
            try:
                data = encode_event(model)
                self._check_size(model, data)
            except (ValueError, TypeError) as exc:  # JSONEncodeError is a TypeError
                self._unsendable(p, key, model, exc)
                continue
            if current and size + 1 + len(data) + 2 > self._max_bytes:
                batches.append(_Batch(p, key, current))
                current = []
            size = size + 1 + len(data) if current else len(data)
            current.append(data)
        if current:
            batches.append(_Batch(p, key, current))
        return batches

    def _unsendable(self, p: int, key: bytes, model: AnyEvent, error: BaseException) -> None:
        """An event record() accepted but no message can carry: raised by flush/close."""
        log.error("event %r of %r cannot be sent: %s", model.id, model.subject, error)
        self._unacked -= 1
        self._failed += 1
        self._failures.append((_Batch(p, key, [model.model_dump_json().encode()]), error))
        self._after_settle()

    def _seal_all(self) -> None:
        for p in list(self._since):
            self._seal(p)

    def _seal_for_room(self) -> None:
        """Seal the fullest partial buffers until acknowledging what is sealed makes room.

        Buffered events make room only once sent, so a full buffer must not wait for
        linger. Sealing every partial buffer at each wait, though, sends a burst of small
        messages whenever the buffer is small next to partitions x batch size (each
        message costs Kafka about as much as a full one); record() resumes at
        `_resume_at`, so the rest may keep filling.
        """
        sizes = {p: self._buffered(p) for p in self._since}
        unsealed = sum(sizes.values())
        for p in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if unsealed <= self._resume_at:
                return
            self._seal(p)
            unsealed -= sizes[p]

    def _buffered(self, p: int) -> int:
        """Events recorded for partition p and not sealed yet."""
        if self._encoder is not None:
            return self._encoder.count(p)
        return len(self._buffers[p].models) or len(self._buffers[p].events)

    async def _wait_for_room(self) -> None:
        self._seal_for_room()
        self._room.clear()
        await self._room.wait()
        if self._state is not _OPEN:
            self._refuse()

    async def _wait_safe(self, deadline: float) -> bool:
        """Until every recorded event is acknowledged, failed or spooled; False at deadline."""
        self._seal_all()
        loop = asyncio.get_running_loop()
        while self._unacked > 0:
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

    # -- internals: sending ----------------------------------------------------

    async def _sender(self) -> None:
        # One sender keeps messages in the order they were sealed: a partition's
        # batches reach Kafka (or the spool) in recording order.
        while True:
            if not self._pending:
                self._pending_wake.clear()
                await self._pending_wake.wait()
                continue
            if self._spooling:
                if self._resume_direct and self._spool_records == 0 and not self._producer_broken:
                    # The replayer emptied the spool and Kafka acknowledged all of it:
                    # nothing older is left, so direct sends cannot overtake anything.
                    self._spooling = self._spool_full = False
                    log.warning(
                        "Kafka at %s answers again and the spool is empty: sending directly",
                        self.bootstrap,
                    )
                else:
                    await self._spool_pending()
                    continue
            await self._send_direct(self._pending.popleft().batch)

    async def _send_direct(self, batch: _Batch) -> None:
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        value, headers = _message(batch)
        send = asyncio.ensure_future(
            self._producer.send(
                self.topic, value, key=batch.key, partition=batch.partition, headers=headers
            )
        )
        self._sending, self._sending_since, self._send_task = batch, loop.time(), send
        self._sending_superseded = False
        try:
            await asyncio.wait([send])
        except asyncio.CancelledError:
            # Cancelling aiokafka's send() withdraws the message; keep the batch listed as
            # not safe so that close() reports it.
            send.cancel()
            if not self._sending_superseded:
                self._pending.appendleft(_Outgoing(batch))
            raise
        finally:
            self._sending, self._send_task = None, None
        if self._sending_superseded:
            # The watchdog moved this batch to the spool while send() hung; if send()
            # got through after all, Kafka sees it twice, which is harmless.
            if _future_error(send) is None:
                send.result().add_done_callback(_retrieve)
            return
        error = _future_error(send)
        if error is not None:
            self._direct_failed(batch, error)
            return
        future = send.result()
        future.add_done_callback(_retrieve)
        self._messages += 1
        self._bytes += len(value)
        self._inflight[future] = _InFlight(batch, self._sending_since)
        future.add_done_callback(functools.partial(self._delivered, batch))

    def _delivered(self, batch: _Batch, future: asyncio.Future[Any]) -> None:
        if future not in self._inflight:
            return  # moved to the spool meanwhile; the replayer looks at this future
        error = _future_error(future)
        if error is None or self._spool is None or _classify(error) is _Fault.MESSAGE:
            del self._inflight[future]
            self._settle(batch, error)
            return
        # Still listed in _inflight, so it goes to the spool in its place in line.
        self._begin_spooling(f"{type(error).__name__}: {error}")

    def _direct_failed(self, batch: _Batch, error: BaseException) -> None:
        if self._spool is None or _classify(error) is _Fault.MESSAGE:
            self._settle(batch, error)
            return
        self._begin_spooling(f"{type(error).__name__}: {error}", failed=batch)

    def _settle(self, batch: _Batch, error: BaseException | None) -> None:
        count = batch.count
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
        self._after_settle()

    def _after_settle(self) -> None:
        if self._unacked <= self._resume_at:
            self._room.set()
        if self._unacked == 0 and self._safe_waiters:
            waiters, self._safe_waiters = self._safe_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- internals: spooling ---------------------------------------------------

    def _begin_spooling(
        self, reason: str, failed: _Batch | None = None, *, renew: bool = True
    ) -> None:
        """From now on batches go to the spool, starting with those Kafka has not acked.

        `renew`: Kafka is presumed gone. The producer is abandoned (the replayer makes a
        new one once Kafka accepts connections), so nothing waits inside the Kafka client
        meanwhile: aiokafka would retry those messages in a tight loop while partitions
        have no leader, and after an outage its idempotence state is often refused.
        """
        if self._spool is None:
            return
        items: list[_Outgoing] = []
        for future, sent in self._inflight.items():
            keep = not renew and (not future.done() or _future_error(future) is None)
            items.append(_Outgoing(sent.batch, future if keep else None))
        self._inflight.clear()
        if failed is not None:
            items.append(_Outgoing(failed))
        if self._sending is not None and not self._sending_superseded:
            send = self._send_task
            original = None
            if send is not None and send.done() and _future_error(send) is None:
                original = None if renew else send.result()
            elif send is not None:
                send.cancel()
            items.append(_Outgoing(self._sending, original))
            self._sending_superseded = True
        if renew:
            self._drop_producer()
        self._pending.extendleft(reversed(items))
        self._pending_wake.set()
        self._resume_direct = False
        if not self._spooling:
            self._spooling = True
            log.warning(
                "Kafka at %s is not taking messages for %s (%s): spooling batches to %s "
                "and replaying them once it answers",
                self.bootstrap,
                self.topic,
                reason,
                self.spool_dir,
            )

    async def _spool_pending(self) -> None:
        spool = self._spool
        assert spool is not None
        items: list[_Outgoing] = []
        size = 0
        for item in self._pending:
            original = item.original
            if original is not None and original.done() and _future_error(original) is None:
                # Kafka acknowledged the earlier send after all: nothing to spool.
                if not items:
                    self._pending.popleft()
                    self._settle(item.batch, None)
                    return
                break
            items.append(item)
            value = item.batch.value
            size += len(value) if value is not None else sum(len(e) for e in item.batch.events)
            if len(items) >= 512 or size >= 8 * 1024 * 1024:
                break
        ids = [next(self._batch_ids) for _ in items]
        records = [
            _encode_spooled(i, self._partitions, item.batch)
            for i, item in zip(ids, items, strict=True)
        ]
        written = (
            len(items) if await self._spool_op(functools.partial(spool.append, records)) else 0
        )
        if not written and len(items) > 1:
            # Nearly full: the oldest batches first, as many as still fit.
            for record in records:
                if not await self._spool_op(functools.partial(spool.append, [record])):
                    break
                written += 1
        for batch_id, item in zip(ids[:written], items[:written], strict=True):
            self._pending.popleft()
            original = item.original
            if original is not None and (not original.done() or _future_error(original) is None):
                self._shadows[batch_id] = original
            count = item.batch.count
            self._unacked -= count
            self._spooled += count
            self._spool_events += count
        self._spool_records = len(spool)
        self._spool_bytes = spool.disk_bytes
        if written:
            self._spool_full = False
            self._replay_wake.set()
            self._after_settle()
            return
        if not self._spool_full:
            self._spool_full = True
            log.error(
                "the spool %s is full (%d of %d bytes) and Kafka at %s is still not taking "
                "messages: %s",
                self.spool_dir,
                spool.disk_bytes,
                self._spool_max,
                self.bootstrap,
                "record() waits (policy block)"
                if self._full_policy == "block"
                else "record() raises SpoolFullError (policy reject)",
            )
            # Wake waiting record() calls: with `reject` they must raise now.
            self._room.set()
        self._spool_room.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._spool_room.wait()

    async def _watchdog(self) -> None:
        spool = self._spool
        assert spool is not None
        loop = asyncio.get_running_loop()
        period = min(0.25, self._unreachable_s / 4)
        while True:
            await asyncio.sleep(period)
            if spool.dirty:
                await self._spool_op(spool.sync_if_due)
            if self._spooling:
                continue
            oldest: float | None = None
            for sent in self._inflight.values():
                oldest = sent.since
                break
            if oldest is None and self._sending is not None:
                oldest = self._sending_since
            if oldest is not None and loop.time() - oldest >= self._unreachable_s:
                self._begin_spooling(f"no acknowledgement for {loop.time() - oldest:.1f}s")

    async def _replayer(self) -> None:
        backoff = _REPLAY_BACKOFF[0]
        while True:
            if not self._spooling or self._spool_records == 0:
                self._replay_wake.clear()
                await self._replay_wake.wait()
                continue
            if self._producer_broken and not await self._renew_producer():
                ok = False
            else:
                ok = await self._replay_window()
            if ok:
                backoff = _REPLAY_BACKOFF[0]
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _REPLAY_BACKOFF[1])

    async def _replay_window(self) -> bool:
        """Send the oldest spooled batches, ack what Kafka acknowledged; False: retry later."""
        spool = self._spool
        assert spool is not None
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        page = await self._spool_op(functools.partial(spool.peek, _REPLAY_RECORDS, _REPLAY_BYTES))
        if not page:
            self._spool_records = len(spool)
            return True
        producer = self._producer
        entries: list[tuple[SpoolPosition, _Spooled | None, list[asyncio.Future[Any]]]] = []
        failure: BaseException | None = None
        self._replay_window_since = loop.time()
        try:
            for position, data in page:
                try:
                    spooled = _decode_spooled(data)
                except ValueError as exc:
                    entries.append((position, None, []))
                    failure = exc
                    break
                futures: list[asyncio.Future[Any]] = []
                original = self._shadows.pop(spooled.batch_id, None)
                if original is not None and (
                    not original.done() or _future_error(original) is None
                ):
                    futures.append(original)
                else:
                    for batch in self._placed(spooled):
                        value, headers = _message(batch)
                        try:
                            future = await producer.send(
                                self.topic,
                                value,
                                key=batch.key,
                                partition=batch.partition,
                                headers=headers,
                            )
                        except Exception as exc:
                            failure = exc
                            break
                        future.add_done_callback(_retrieve)
                        self._messages += 1
                        self._bytes += len(value)
                        futures.append(future)
                entries.append((position, spooled, futures))
                if failure is not None:
                    break
            waiting = [f for _, _, futures in entries for f in futures]
            if waiting:
                # As for direct sends: unanswered for unreachable_after_s, Kafka is gone
                # again (the producer is then replaced, which abandons these).
                await asyncio.wait(waiting, timeout=self._unreachable_s)
        finally:
            self._replay_window_since = None

        delivered = 0
        broken_at: int | None = None
        for index, (_, _, futures) in enumerate(entries):
            if not all(f.done() for f in futures):
                failure = TimeoutError(f"no acknowledgement for {self._unreachable_s:.1f}s")
                broken_at = index
                break
            errors = [e for e in map(_future_error, futures) if e is not None]
            last = index == len(entries) - 1
            if errors or (last and failure is not None):
                failure = errors[0] if errors else failure
                broken_at = index
                break
            delivered += 1
        if delivered:
            events = sum(len(s.batch.events) for _, s, _ in entries[:delivered] if s is not None)
            await self._ack_spooled(entries[delivered - 1][0], events)
        if broken_at is None:
            self._replay_failing = False
            return True
        assert failure is not None
        position, refused, _ = entries[broken_at]
        fault = _Fault.MESSAGE if refused is None else _classify(failure)
        if fault is _Fault.MESSAGE:
            await self._set_aside(position, refused, page[broken_at][1], failure)
            return True
        self._drop_producer()
        if not self._replay_failing:
            log.warning(
                "replaying the spool %s: Kafka at %s did not take a message (%s: %s); "
                "retrying until it does",
                self.spool_dir,
                self.bootstrap,
                type(failure).__name__,
                failure,
            )
        self._replay_failing = True
        return False

    def _placed(self, spooled: _Spooled) -> list[_Batch]:
        batch = spooled.batch
        if batch.partition is None or spooled.partitions == self._partitions:
            return [batch]
        # The topic's partition count changed since this was spooled: place its events
        # as record() places them now, so each account stays in one partition.
        groups: dict[int, _Batch] = {}
        for event in batch.events:
            subject = str(orjson.loads(event)["subject"])
            p = partition_for(subject, self._partitions)
            groups.setdefault(p, _Batch(p, subject.encode(), [])).events.append(event)
        return list(groups.values())

    async def _ack_spooled(self, position: SpoolPosition, events: int) -> None:
        spool = self._spool
        assert spool is not None
        await self._spool_op(functools.partial(spool.ack, position))
        self._spool_records = len(spool)
        self._spool_bytes = spool.disk_bytes
        self._spool_events = max(self._spool_events - events, 0)
        self._replayed += events
        self._acked += events
        self._spool_room.set()
        if self._spool_records == 0:
            self._spool_events = 0
            self._resume_direct = True
            self._pending_wake.set()
            log.info("the spool %s is drained (%d events replayed)", self.spool_dir, self._replayed)

    async def _set_aside(
        self,
        position: SpoolPosition,
        spooled: _Spooled | None,
        raw: bytes,
        error: BaseException,
    ) -> None:
        """A spooled batch Kafka refuses for good: keep it next to the spool, move on."""
        assert self.spool_dir is not None
        target = await self._spool_op(
            functools.partial(_write_undeliverable, self.spool_dir, position, spooled, raw)
        )
        count = len(spooled.batch.events) if spooled is not None else 0
        log.error(
            "Kafka at %s refuses a spooled message of %d event(s) for good (%s: %s); it was "
            "moved to %s. Fix the cause and record those events again (a re-sent event is "
            "counted once).",
            self.bootstrap,
            count,
            type(error).__name__,
            error,
            target,
        )
        if spooled is not None:
            self._failed += count
            self._failures.append((spooled.batch, error))
        await self._ack_spooled(position, count)
        self._replayed -= count
        self._acked -= count

    def _drop_producer(self) -> None:
        """Abandon the producer (what it holds is in the spool); the replayer makes another."""
        old, self._producer = self._producer, None
        self._producer_broken = True
        # Their deliveries belong to the abandoned producer: the spool sends copies.
        for original in self._shadows.values():
            original.add_done_callback(_retrieve)
        self._shadows.clear()
        if old is not None:
            task = asyncio.get_running_loop().create_task(
                self._stop_producer(old, abandon=True, timeout=5.0)
            )
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def _renew_producer(self) -> bool:
        """A new producer once Kafka accepts connections; False while it does not."""
        new = self._factory()
        try:
            await new.start()
            await new.partitions_for(self.topic)
        except Exception as exc:
            if not self._replay_failing:
                log.warning(
                    "cannot reach Kafka at %s yet (%r); the spool waits, trying again",
                    self.bootstrap,
                    exc,
                )
            self._replay_failing = True
            await self._stop_producer(new, abandon=True, timeout=2.0)
            return False
        self._producer = new
        self._producer_broken = False
        log.info("connected to Kafka at %s; replaying the spool", self.bootstrap)
        return True

    async def _spool_op(self, fn: Callable[[], _T]) -> _T:
        """Run a spool call in a worker thread: the event loop never waits for a disk."""
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Let it finish: the spool must not be closed under a running call.
            with contextlib.suppress(Exception):
                await future
            raise

    # -- internals: shutting down -----------------------------------------------

    async def _wait_replay(self, deadline: float) -> None:
        """While Kafka takes replayed batches and time remains, let the spool drain."""
        loop = asyncio.get_running_loop()
        while self._spool is not None and self._spool_records and loop.time() < deadline:
            since = self._replay_window_since
            stalled = since is not None and loop.time() - since >= self._unreachable_s
            if self._replay_failing or self._producer_broken or stalled:
                return
            await asyncio.sleep(0.02)

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in list(self._retired):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _unsafe_events(self) -> list[bytes]:
        events = [e for item in self._pending for e in item.batch.events]
        events += [e for sent in self._inflight.values() for e in sent.batch.events]
        events += [e for buf in self._buffers for e in buf.events]
        events += [encode_event(m) for buf in self._buffers for m in buf.models]
        if self._encoder is not None:
            for p in range(self._partitions):
                value, count = self._encoder.take(p)
                if count:
                    events += _Batch(p, b"", value=value, count=count).events
        return events

    async def _stop_producer(
        self,
        producer: KafkaProducer,
        *,
        abandon: bool,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        if abandon:
            # Kafka is away and what the producer still holds is in the spool: a graceful
            # stop would wait for those messages until Kafka comes back.
            _fail_pending(producer)
        try:
            async with asyncio.timeout(timeout):
                await producer.stop()
        except TimeoutError:
            log.warning("the Kafka producer did not stop within %.1fs; abandoning it", timeout)
            _fail_pending(producer)
            await _force_close(producer)
        except Exception as exc:
            log.warning("stopping the Kafka producer failed: %r", exc)

    async def _close_spool(self) -> None:
        spool = self._spool
        if spool is None:
            return
        self._left_in_spool = self._spool_events if len(spool) else 0
        self._spool_bytes = spool.disk_bytes
        await asyncio.to_thread(spool.close)
        if self._spool_dir_is_default and not self._left_in_spool:
            # An empty spool removes its own directory; tidy the default layout's parents
            # (<data_dir>/spool/<topic>) too when nothing else lives there.
            assert self.spool_dir is not None
            for parent in (self.spool_dir.parent, self.spool_dir.parent.parent):
                try:
                    parent.rmdir()
                except OSError:
                    break

    def _report_close(self, unsafe: list[bytes]) -> None:
        if self._left_in_spool:
            log.warning(
                "gateway for %s closed with %d event(s) (%d bytes) in the spool %s; the next "
                "Gateway started on that directory replays them",
                self.topic,
                self._left_in_spool,
                self._spool_bytes,
                self.spool_dir,
            )
        else:
            log.info(
                "gateway for %s closed: %d event(s) recorded, %d acknowledged by Kafka, "
                "%d not safe",
                self.topic,
                self._recorded,
                self._acked,
                len(unsafe),
            )

    def _raise_failures(self, unsafe: list[bytes] | None = None, budget: float = 0.0) -> None:
        if not self._failures and not unsafe:
            return
        failures, self._failures = self._failures, []
        events = tuple(e for batch, _ in failures for e in batch.events)
        causes = tuple(error for _, error in failures)
        parts: list[str] = []
        if failures:
            first = causes[0]
            parts.append(
                f"Kafka did not acknowledge {len(failures)} message(s) holding "
                f"{len(events)} event(s) for topic {self.topic!r} at {self.bootstrap} (first "
                f"error: {type(first).__name__}: {first}); those events were NOT delivered."
            )
        if unsafe:
            where = "spooled" if self._spool is not None else "spooled (the spool is off)"
            parts.append(
                f"{len(unsafe)} event(s) were neither acknowledged by Kafka at "
                f"{self.bootstrap} nor {where} within {budget:.1f}s; they may NOT have been "
                "delivered."
            )
        parts.append(
            "Check the broker and the topic, then record them again (error.failed_events; "
            "a re-sent event is counted once)."
        )
        raise GatewaySendError(" ".join(parts), events + tuple(unsafe or ()), causes) from (
            causes[0] if causes else None
        )


def _count_events(spool: Spool) -> int:
    total = 0
    after: SpoolPosition | None = None
    while page := spool.peek(1_024, 64 * 1024 * 1024, after=after):
        total += sum(_spooled_events(data) for _, data in page)
        after = page[-1][0]
    return total


def _write_undeliverable(
    directory: Path, position: SpoolPosition, spooled: _Spooled | None, raw: bytes
) -> Path:
    if spooled is None:
        target = directory / f"undeliverable-{position.segment}-{position.offset}.bin"
        target.write_bytes(raw)
    else:
        target = directory / _UNDELIVERABLE
        with target.open("ab") as f:
            f.write(b"".join(event + b"\n" for event in spooled.batch.events))
            f.flush()
            os.fsync(f.fileno())
    return target


def _fail_pending(producer: KafkaProducer) -> None:
    """Resolve what aiokafka's accumulator holds, so that stop() does not wait for Kafka.

    aiokafka-specific and best effort (other producers, e.g. test fakes, lack these
    attributes). Its own `fail_all` does the work; around it, the bookkeeping aiokafka's
    callbacks expect, lest they log a KeyError or unretrieved exceptions for every batch.
    """
    accumulator: Any = getattr(producer, "_message_accumulator", None)
    if accumulator is None or not callable(getattr(accumulator, "fail_all", None)):
        return
    error = kafka_errors.KafkaConnectionError(
        "abandoned by the gateway: Kafka was unreachable; the messages are spooled"
    )
    with contextlib.suppress(Exception):
        queued = [b for batches in accumulator._batches.values() for b in batches]
        # A batch sent once and queued again for a retry still has the callback that
        # removes it from _pending_batches when it completes.
        accumulator._pending_batches.update(b for b in queued if b.retry_count > 0)
        batches = [*queued, *accumulator._pending_batches]
        accumulator.fail_all(error)
        for batch in batches:
            for future in (batch.future, batch._drain_waiter):
                if future.done() and not future.cancelled():
                    future.exception()


async def _force_close(producer: KafkaProducer) -> None:
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if isinstance(task, asyncio.Task):
        task.cancel()
    client = getattr(producer, "client", None)
    close = getattr(client, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await close()


def _positive(name: str, value: int | None, default: int) -> int:
    chosen = default if value is None else value
    if chosen < 1:
        raise ValueError(f"{name} must be at least 1, got {chosen}")
    return chosen


def _seconds(name: str, value: float | None, default: float) -> float:
    chosen = default if value is None else value
    if chosen <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {chosen}")
    return chosen


# -- shutting down on signals ---------------------------------------------------


@dataclass(eq=False)
class ShutdownHandle:
    """What `install_signal_handlers` returns: await `wait()` to know the gateway closed."""

    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    signals: tuple[signal.Signals, ...]
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a signal arrived and the gateway is closed (successfully or not)."""
    received: signal.Signals | None = None
    spooled: int = 0
    """Events left in the spool by the close."""
    error: Exception | None = None
    """What the close raised (a GatewaySendError: events that may be lost)."""
    task: asyncio.Task[None] | None = None

    async def wait(self) -> int:
        """Until a signal closed the gateway; returns the events left spooled, or raises
        what the close raised."""
        await self.closed.wait()
        if self.error is not None:
            raise self.error
        return self.spooled

    def remove(self) -> None:
        """Give the signals back to their default handling."""
        for sig in self.signals:
            self.loop.remove_signal_handler(sig)


def install_signal_handlers(
    gateway: Gateway,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    timeout: float | None = None,
    before_close: Callable[[], Awaitable[None]] | None = None,
) -> ShutdownHandle:
    """On SIGTERM/SIGINT, flush and close `gateway`: no recorded event is left in memory.

    The first signal awaits `before_close` (stop taking requests there, so nothing calls
    `record` on a closing gateway), then `gateway.close(timeout)`: every recorded event
    ends up acknowledged by Kafka or in the spool, which the next start replays. Keep
    `timeout` (default `close_timeout_s`, 30 s) below the time the supervisor waits
    between SIGTERM and SIGKILL (Kubernetes: terminationGracePeriodSeconds, 30 s by
    default). Further signals while closing are logged and ignored. Unix only; call it
    from the thread running the loop.

        async def main() -> None:
            async with Gateway() as gateway:
                server = await start_my_http_server(gateway)   # calls gateway.record()
                shutdown = install_signal_handlers(gateway, before_close=server.stop)
                left = await shutdown.wait()    # returns once SIGTERM closed the gateway
                print(f"closed; {left} event(s) wait in the spool for the next start")
    """
    running = loop if loop is not None else asyncio.get_running_loop()
    handle = ShutdownHandle(gateway, running, tuple(signals))

    async def shut_down() -> None:
        try:
            if before_close is not None:
                try:
                    await before_close()
                except Exception:
                    log.exception("before_close failed; closing the gateway anyway")
            handle.spooled = await gateway.close(timeout)
        except Exception as exc:
            handle.error = exc
            log.error("closing the gateway on %s: %s", handle.received, exc)
        finally:
            handle.closed.set()

    def on_signal(sig: signal.Signals) -> None:
        if handle.task is not None:
            log.warning("%s: already closing the gateway; waiting for that to finish", sig.name)
            return
        handle.received = sig
        log.warning("%s: flushing the gateway to Kafka or its spool, then closing", sig.name)
        handle.task = running.create_task(shut_down(), name="tally-gateway-shutdown")

    for sig in handle.signals:
        running.add_signal_handler(sig, on_signal, sig)
    return handle
