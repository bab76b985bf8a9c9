"""Batching: each recorded event joins its partition's buffer, and a buffer becomes one
batch message (`seal`) when it is full, when its oldest event waited `linger_s`, or when
the gateway needs room or a flush.

Events are placed as Kafka's default partitioner places key = subject (docs/api.md#partitioning), so
a batch only ever holds events of its own partition. One of three encodings, chosen
when the gateway starts (`Encoding`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Final

import orjson

from producers.batches import Batch, Receipt
from producers.events import (
    MAX_PLAIN_EVENT_BYTES,
    PLAIN_EVENT_TYPES,
    encode_event,
    encode_events,
)
from producers.ledger import Failure, Ledger
from producers.partitioning import partition_for
from schemas.events import AnyEvent

if TYPE_CHECKING:
    from tally_fold import BatchEncoder

log = logging.getLogger("producers.gateway")

_PLACEMENT_CACHE: Final = 1 << 18


class Encoding(Enum):
    NATIVE = "each event written into its partition's message at once (native/)"
    DEFERRED = "models buffered, each buffer encoded as one array when sealed"
    EXACT = "each event encoded, and measured, as it is recorded"


# An Enum member read through its class costs ~0.1 µs on CPython 3.11: add() compares
# with this alias, once per event.
_DEFERRED: Final = Encoding.DEFERRED


class _Buffer:
    __slots__ = ("events", "key", "models", "receipts", "size")

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.size = 0
        """Bytes of the events joined by commas (the brackets excluded)."""
        self.key = b""
        self.models: list[AnyEvent] = []
        """Events not encoded yet (deferred mode: encoded as one array when sealed)."""
        self.receipts: list[Receipt] = []
        """The `deliver` calls with events in this buffer; they go with it when sealed."""


class Batcher:
    """Per-partition buffers; sealed buffers go to `enqueue` (the sender), in order.

    Counts each event it takes as recorded and not safe (`Ledger.recorded`, `unacked`).
    """

    def __init__(
        self,
        ledger: Ledger,
        enqueue: Callable[[Batch], None],
        *,
        max_batch: int,
        max_bytes: int,
        linger_s: float,
    ) -> None:
        self._ledger = ledger
        self._enqueue = enqueue
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self.partitions = 0
        self.encoding = Encoding.EXACT
        self._buffers: list[_Buffer] = []
        self._encoder: BatchEncoder | None = None
        # subject -> partition: one dict lookup instead of murmur2 (pure Python) per event.
        self._placement: dict[str, int] = {}
        # Partitions with buffered events -> when the oldest arrived; insertion
        # order is age order, so the linger task only ever looks at the first.
        self._since: dict[int, float] = {}
        self._wake = asyncio.Event()

    def open(self, partitions: int, encoder: BatchEncoder | None) -> None:
        """Buffers for the topic's `partitions`; `encoder`: native encoding (None: Python).

        Without the encoder, deferred when no plain event can be too large for a message
        (a native call per buffer instead of one per event), otherwise exact.
        """
        self.partitions = partitions
        self._buffers = [_Buffer() for _ in range(partitions)]
        self._encoder = encoder
        if encoder is not None:
            self.encoding = Encoding.NATIVE
        elif self._max_bytes >= MAX_PLAIN_EVENT_BYTES + 2:
            self.encoding = Encoding.DEFERRED
        else:
            self.encoding = Encoding.EXACT

    # -- taking events -------------------------------------------------------------

    def add(self, event: AnyEvent) -> bool:
        """Buffer `event`; True when a message was sealed (the caller should yield, so that
        a tight loop of record() lets the sender run). Raises ValueError for an event no
        message can carry."""
        encoder = self._encoder
        if encoder is not None:
            # Places the event as _place does and writes it into that partition's message.
            n = encoder.add(event)
            if 1 < n < self._max_batch:
                ledger = self._ledger
                ledger.recorded += 1
                ledger.unacked += 1
                return False
            return self._added(encoder, event, n)
        subject = event.subject
        p = self._placement.get(subject)
        if p is None:
            p = self._place(subject)
        if self.encoding is not _DEFERRED:
            return self._add_encoded(p, subject, event)
        # Deferred, inline: the Python modes' usual path, once per event.
        if event.datacontenttype is not None or type(event) not in PLAIN_EVENT_TYPES:
            # Not bounded by MAX_PLAIN_EVENT_BYTES: measure it now, so that an event
            # too large for any message is refused here, not lost at seal.
            self.check_size(event, encode_event(event))
        buf = self._buffers[p]
        if buf.events:  # encoded events of `add_raw` go out first, in order
            self.seal(p)
            buf = self._buffers[p]
        models = buf.models
        if not models:
            buf.key = subject.encode()
            self._started(p)
        models.append(event)
        ledger = self._ledger
        ledger.recorded += 1
        ledger.unacked += 1
        if len(models) >= self._max_batch:
            self.seal(p)
            return True
        return False

    def _add_encoded(self, p: int, subject: str, event: AnyEvent) -> bool:
        data = encode_event(event)
        self.check_size(event, data)
        held = self._add_raw_python(p, subject, data)
        ledger = self._ledger
        ledger.recorded += 1
        ledger.unacked += 1
        if held >= self._max_batch:
            self.seal(p)
            return True
        return False

    def add_raws(self, events: Sequence[tuple[str, bytes]], receipt: Receipt) -> bool:
        """Buffer events already encoded, each (subject, its JSON), in its subject's
        partition, for `receipt` to learn when Kafka acknowledged them all. True when a
        message was sealed. Raises ValueError, before taking any, when one of them fits
        in no message.

        One loop for the whole list (POST /api/v1/events hands a body's events at
        once): with the native encoder, the common event costs a placement lookup and
        one native call; the first event of a message, and a full one, take the slow
        path below.
        """
        limit = self._max_bytes - 2
        for subject, data in events:
            if len(data) > limit:
                raise ValueError(
                    f"an event of {subject!r} is {len(data)} bytes, more than the largest "
                    f"message ({self._max_bytes} bytes)"
                )
        placement = self._placement
        buffers = self._buffers
        max_batch = self._max_batch
        encoder = self._encoder
        sealed = False
        for subject, data in events:
            p = placement.get(subject)
            if p is None:
                p = self._place(subject)
            if encoder is not None:
                n = encoder.add_raw(p, data)
                if n <= 1:
                    n = self._first_or_full(encoder, p, subject, data, n)
            else:
                n = self._add_raw_python(p, subject, data)
            receipts = buffers[p].receipts
            if not receipts or receipts[-1] is not receipt:
                receipts.append(receipt)
                receipt.pending += 1
            if n >= max_batch:
                self.seal(p)
                sealed = True
        ledger = self._ledger
        ledger.recorded += len(events)
        ledger.unacked += len(events)
        return sealed

    def _first_or_full(
        self, encoder: BatchEncoder, p: int, subject: str, data: bytes, n: int
    ) -> int:
        """`add_raws`, native: the encoder took the first event of a message (n = 1) or
        found the message full (seal it, then write the event into the next)."""
        if n == encoder.FULL:
            self.seal(p)
            n = encoder.add_raw(p, data)
        if n <= 0:
            raise AssertionError(f"the encoder refused {len(data)} bytes within the bound")
        if n == 1:
            self._buffers[p].key = subject.encode()
            self._started(p)
        return n

    def _add_raw_python(self, p: int, subject: str, data: bytes) -> int:
        """`add_raws` without the encoder: join partition p's encoded events; how many
        it then holds. Models buffered by `add` (deferred mode) go out first, in order."""
        buf = self._buffers[p]
        if buf.models or (buf.events and buf.size + 1 + len(data) + 2 > self._max_bytes):
            self.seal(p)
            buf = self._buffers[p]
        if not buf.events:
            buf.key = subject.encode()
            buf.size = len(data)
            self._started(p)
        else:
            buf.size += 1 + len(data)
        buf.events.append(data)
        return len(buf.events)

    def _started(self, p: int) -> None:
        """Partition p's buffer took its first event: linger starts counting."""
        if not self._since:
            self._wake.set()
        self._since[p] = asyncio.get_running_loop().time()

    def _added(self, encoder: BatchEncoder, event: AnyEvent, n: int) -> bool:
        """Native mode, one event in a hundred or so: the encoder took the first event of
        a message (n = 1), filled one, or did not take the event (n <= 0). True when it
        sealed a message."""
        if n > 0:
            p = encoder.last
        else:
            p, n = self._add_slowly(encoder, event, n)
        if n == 1:
            self._buffers[p].key = event.subject.encode()
            self._started(p)
        ledger = self._ledger
        ledger.recorded += 1
        ledger.unacked += 1
        if n >= self._max_batch:
            self.seal(p)
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
            else partition_for(event.subject, self.partitions)
        )
        while True:
            if result == encoder.FULL:
                self.seal(p)
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
                self.check_size(event, data)
                raise AssertionError(f"the encoder refused {len(data)} bytes within the bound")
            result = encoder.add(event) if data is None else encoder.add_raw(p, data)
            if result > 0:
                return p, result

    def check_size(self, event: AnyEvent, data: bytes) -> None:
        """Raises ValueError when `data` (event's JSON) fits in no message."""
        if len(data) + 2 > self._max_bytes:
            raise ValueError(
                f"event {event.id!r} of {event.subject!r} encodes to {len(data)} bytes, more "
                f"than the largest message ({self._max_bytes} bytes), so it can never be "
                "sent: shorten its labels or raise TALLY_PRODUCER_MAX_MESSAGE_BYTES"
            )

    def _place(self, subject: str) -> int:
        p = partition_for(subject, self.partitions)
        if len(self._placement) >= _PLACEMENT_CACHE:
            # Bounded memory under a flood of distinct subjects; refilling is cheap.
            self._placement.clear()
        self._placement[subject] = p
        return p

    # -- sealing -------------------------------------------------------------------

    def seal(self, p: int) -> None:
        """Hand partition p's buffered events to the sender as one message."""
        buf = self._buffers[p]
        receipts = buf.receipts or None
        if receipts is not None:
            buf.receipts = []
        if self._encoder is not None:
            value, count = self._encoder.take(p)
            self._since.pop(p, None)
            if count == 1:  # a lone event goes out as a single event, as in the other modes
                self._enqueue(Batch(p, buf.key, [value[1:-1]], receipts=receipts))
            elif count:
                self._enqueue(Batch(p, buf.key, value=value, count=count, receipts=receipts))
            return
        if buf.models:
            self._buffers[p] = _Buffer()
            self._since.pop(p, None)
            for batch in self._encode_models(p, buf.key, buf.models):
                self._enqueue(batch)
            return
        if not buf.events:
            return
        self._enqueue(Batch(p, buf.key, buf.events, receipts=receipts))
        self._buffers[p] = _Buffer()
        self._since.pop(p, None)

    def _encode_models(self, p: int, key: bytes, models: list[AnyEvent]) -> list[Batch]:
        """Deferred mode: one batch message, unless it is too large (or not encodable)."""
        if len(models) > 1:
            try:
                value = encode_events(models)
            except orjson.JSONEncodeError:
                value = b""
            if value and len(value) <= self._max_bytes:
                return [Batch(p, key, value=value, count=len(models))]
        # Rare: events near the size bound, or not encodable (an int beyond 64 bits, a
        # model built without validation). Pack them one by one, as the exact mode does.
        batches: list[Batch] = []
        current: list[bytes] = []
        size = 0
        for model in models:
            try:
                data = encode_event(model)
                self.check_size(model, data)
            except (ValueError, TypeError) as exc:  # JSONEncodeError is a TypeError
                self._unsendable(p, key, model, exc)
                continue
            if current and size + 1 + len(data) + 2 > self._max_bytes:
                batches.append(Batch(p, key, current))
                current = []
            size = size + 1 + len(data) if current else len(data)
            current.append(data)
        if current:
            batches.append(Batch(p, key, current))
        return batches

    def _unsendable(self, p: int, key: bytes, model: AnyEvent, error: BaseException) -> None:
        """An event record() accepted but no message can carry: raised by flush/close."""
        log.error("event %r of %r cannot be sent: %s", model.id, model.subject, error)
        ledger = self._ledger
        ledger.unacked -= 1
        ledger.failed += 1
        ledger.failures.append(Failure(Batch(p, key, [model.model_dump_json().encode()]), error))
        ledger.after_settle()

    def seal_all(self) -> None:
        for p in list(self._since):
            self.seal(p)

    def seal_for_room(self) -> None:
        """Seal the fullest partial buffers until acknowledging what is sealed makes room.

        Buffered events make room only once sent, so a full buffer must not wait for
        linger. Sealing every partial buffer at each wait, though, sends a burst of small
        messages whenever the buffer is small next to partitions x batch size (each
        message costs Kafka about as much as a full one); record() resumes at
        `Ledger.resume_at`, so the rest may keep filling.
        """
        sizes = {p: self._buffered(p) for p in self._since}
        unsealed = sum(sizes.values())
        for p in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if unsealed <= self._ledger.resume_at:
                return
            self.seal(p)
            unsealed -= sizes[p]

    def _buffered(self, p: int) -> int:
        """Events recorded for partition p and not sealed yet."""
        if self._encoder is not None:
            return self._encoder.count(p)
        return len(self._buffers[p].models) or len(self._buffers[p].events)

    async def linger(self) -> None:
        """Task: seal each buffer whose oldest event waited `linger_s`."""
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
                self.seal(p)

    def unsealed_events(self) -> list[bytes]:
        """The buffered events, encoded, taking them out (for close's report)."""
        events = [e for buf in self._buffers for e in buf.events]
        events += [encode_event(m) for buf in self._buffers for m in buf.models]
        if self._encoder is not None:
            for p in range(self.partitions):
                value, count = self._encoder.take(p)
                if count:
                    events += Batch(p, b"", value=value, count=count).events
        return events
