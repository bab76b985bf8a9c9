"""One batch step of the worker: messages in, rollup rows and dead letters out (pure).

Exactly-once rests on one rule: a batch's rollup rows and the offsets it consumed
are committed together (one Kafka transaction, see processors/app.py). When a
worker takes a partition, it learns the next offset not yet counted (`resume`),
and a message below it is only remembered for deduplication, never counted
again. Kafka may therefore redeliver anything; the count does not move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import monotonic
from typing import cast

from processors.decode import NATIVE_MAX_EVENT_BYTES, Flat, Limits, Rejection, decode_flat
from processors.dedup import Deduplicator
from processors.rollup import RollupBuilder
from schemas.deltas import BODY_BUDGET, wire_bodies
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.windows import epoch_micros

try:
    # The worker's hot path in native code (native/, built by `make setup`): the same
    # fold as the Python reference below, which it falls back to message by message.
    from tally_fold import Dedup, Fold
except ImportError:  # pragma: no cover - a checkout installed without native/
    Dedup = Fold = None  # type: ignore[assignment,misc]


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int = 0
    """Kafka's record timestamp: when the gateway published it."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    rejection: Rejection
    partition: int
    offset: int


@dataclass(slots=True)
class BatchResult:
    dead_letters: list[DeadLetter]
    next_offsets: dict[int, int]
    published_until_ms: dict[int, int] = field(default_factory=dict)
    """Per partition, the Kafka timestamp of the last message processed."""
    counted: int = 0
    duplicates: int = 0
    replayed: int = 0
    """Messages below the resume offset: already counted before a restart."""
    fast_messages: int = 0
    """Messages the native fold took whole; the others went through decode_flat. The
    parity tests read it to prove that the fold they compare really ran."""
    by_type: dict[str, int] = field(default_factory=dict)
    bodies: list[tuple[bytes, int]] = field(default_factory=list)
    """The rollup rows as delta row parts and their row counts, each part within one
    delta message (schemas/deltas.py `encode_bodies`)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Pipeline:
    def __init__(
        self,
        topic: str,
        limits: Limits,
        dedup_window_s: float,
        dedup_max_keys: int,
        clock: Callable[[], datetime] = _utcnow,
        native: bool = True,
    ) -> None:
        self.topic = topic
        self.limits = limits
        # One fold, cleared per batch: it keeps its memory, so a batch touches no
        # new pages. Only where its size bound holds (decode.NATIVE_MAX_EVENT_BYTES).
        usable = Fold is not None and limits.max_event_bytes >= NATIVE_MAX_EVENT_BYTES
        self._fold = Fold() if native and usable else None
        # Replayed messages go through a fold of their own, whose rows are dropped:
        # only its dedup admissions count.
        self._replay_fold = Fold() if self._fold is not None else None
        self._dedup_window_s = dedup_window_s
        self._dedup_max_keys = dedup_max_keys
        self._clock = clock
        self._resume: dict[int, int] = {}
        self._dedup: dict[int, Deduplicator | Dedup] = {}

    def resume(self, partition: int, next_offset: int) -> None:
        """Start a partition: offsets below `next_offset` are already counted."""
        self._resume[partition] = next_offset
        window, keys = self._dedup_window_s, self._dedup_max_keys
        # The native fold dedups natively: no Python string per key.
        self._dedup[partition] = (
            Deduplicator(window, keys) if self._fold is None else Dedup(window, keys, monotonic)
        )

    def remember(self, partition: int, value: bytes | None) -> None:
        """Feed an already-counted message to dedup only (rebuilding after a takeover)."""
        self._remember(self._dedup[partition], value, self._clock())

    def forget(self, partition: int) -> None:
        """The partition went to another worker; its state is theirs now."""
        self._resume.pop(partition, None)
        self._dedup.pop(partition, None)

    def dedup_keys(self) -> int:
        return sum(len(d) for d in self._dedup.values())

    def process(self, messages: Iterable[Message]) -> BatchResult:
        """Fold a batch of messages into delta row parts (`BatchResult.bodies`, what the
        worker publishes): natively when tally_fold is installed and usable, else by
        the Python reference (RollupBuilder)."""
        now = self._clock()
        limits = self.limits
        fold = self._fold
        builder = RollupBuilder()
        if fold is None:
            add: Callable[[Flat], None] = builder.add_flat
        else:
            fold.clear()
            add = self._native_adder(fold)
            lo_us, hi_us = limits.on_time_us(now)
            max_message, max_event = limits.max_message_bytes, limits.max_event_bytes
        requests = opened = closed = 0
        result = BatchResult(dead_letters=[], next_offsets={})
        resume, dedups = self._resume, self._dedup
        next_offsets, published = result.next_offsets, result.published_until_ms
        by_type: dict[str, int] = {}
        counted = duplicates = 0
        for message in messages:
            partition = message.partition
            if partition not in resume:
                raise RuntimeError(f"partition {partition} was not resumed before processing")
            dedup = dedups[partition]
            first_time = dedup.first_time
            value = message.value
            if message.offset < resume[partition]:
                result.replayed += 1
                self._remember(dedup, value, now)
                continue
            counts = (
                # resume() gives every partition a native Dedup when the fold is native.
                fold.add_message(value, lo_us, hi_us, max_event, cast(Dedup, dedup))
                if fold is not None and value is not None and len(value) <= max_message
                else None
            )
            if counts is not None:
                result.fast_messages += 1
                r, o, c, d = counts
                requests += r
                opened += o
                closed += c
                duplicates += d
            else:
                events, rejections = decode_flat(value, now, limits)
                for rejection in rejections:
                    result.dead_letters.append(DeadLetter(rejection, partition, message.offset))
                for event in events:
                    if first_time(event.source, event.id):
                        add(event)
                        counted += 1
                        by_type[event.type] = by_type.get(event.type, 0) + 1
                    else:
                        duplicates += 1
            next_offsets[partition] = resume[partition] = message.offset + 1
            if message.timestamp_ms > published.get(partition, 0):
                published[partition] = message.timestamp_ms
            else:
                published.setdefault(partition, 0)
        # The native path counts by type in locals; merged so that by_type holds the
        # same keys, in the same order of first appearance, as counting per event did
        # only when no native message came first; the order of a dict's keys is not
        # part of the result's meaning (it is compared as a dict).
        for kind, n in ((REQUEST, requests), (STREAM_OPENED, opened), (STREAM_CLOSED, closed)):
            if n:
                by_type[kind] = by_type.get(kind, 0) + n
        counted += requests + opened + closed
        result.counted, result.duplicates, result.by_type = counted, duplicates, by_type
        if fold is not None:
            result.bodies = fold.bodies(BODY_BUDGET)
        else:
            result.bodies = wire_bodies(builder.wire_rows())
        return result

    def _remember(self, dedup: Deduplicator | Dedup, value: bytes | None, now: datetime) -> None:
        """A message below the resume offset: already counted, only remembered."""
        fold = self._replay_fold
        if fold is not None and value is not None and len(value) <= self.limits.max_message_bytes:
            fold.clear()
            lo_us, hi_us = self.limits.on_time_us(now)
            max_event = self.limits.max_event_bytes
            if fold.add_message(value, lo_us, hi_us, max_event, cast(Dedup, dedup)) is not None:
                return
        for event in decode_flat(value, now, self.limits)[0]:
            dedup.first_time(event.source, event.id)

    @staticmethod
    def _native_adder(fold: Fold) -> Callable[[Flat], None]:
        """Fold an event of the Python reference into the native fold, as add_flat would."""
        add_values = fold.add_values

        def add(e: Flat) -> None:
            add_values(e.type, e.subject, int(e.time.timestamp()) // 60 * 60, e.route, e.method,
                       e.model, e.status, e.stream_id, e.units, 0.0 + e.latency_ms, e.bytes_in,
                       e.bytes_out, epoch_micros(e.time))  # fmt: skip

        return add
