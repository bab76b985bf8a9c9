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

from processors.decode import Limits, Rejection, decode_flat, decode_message, decode_native
from processors.dedup import Deduplicator
from processors.rollup import RollupBuilder
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED


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
    rows: list[list[object]]
    """Delta rows; the caller adds the offset markers to the same INSERT. In the
    store's columns (RollupBuilder.rows), or with `process(wire=True)` in the
    delta wire layout (RollupBuilder.wire_rows)."""
    dead_letters: list[DeadLetter]
    next_offsets: dict[int, int]
    published_until_ms: dict[int, int] = field(default_factory=dict)
    """Per partition, the Kafka timestamp of the last message processed."""
    counted: int = 0
    duplicates: int = 0
    replayed: int = 0
    """Messages below the resume offset: already counted before a restart."""
    by_type: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.topic = topic
        self.limits = limits
        self._dedup_window_s = dedup_window_s
        self._dedup_max_keys = dedup_max_keys
        self._clock = clock
        self._resume: dict[int, int] = {}
        self._dedup: dict[int, Deduplicator] = {}

    def knows(self, partition: int) -> bool:
        return partition in self._resume

    def resume(self, partition: int, next_offset: int) -> None:
        """Start a partition: offsets below `next_offset` are already counted."""
        self._resume[partition] = next_offset
        self._dedup[partition] = Deduplicator(self._dedup_window_s, self._dedup_max_keys)

    def remember(self, partition: int, value: bytes | None) -> None:
        """Feed an already-counted message to dedup only (rebuilding after a takeover)."""
        events, _ = decode_message(value, self._clock(), self.limits)
        dedup = self._dedup[partition]
        for event in events:
            dedup.first_time(event.source, event.id)

    def forget(self, partition: int) -> None:
        """The partition went to another worker; its state is theirs now."""
        self._resume.pop(partition, None)
        self._dedup.pop(partition, None)

    def dedup_keys(self) -> int:
        return sum(len(d) for d in self._dedup.values())

    def process(self, messages: Iterable[Message], wire: bool = False) -> BatchResult:
        now = self._clock()
        builder = RollupBuilder()
        add = builder.add_flat
        add_native = builder.add_native
        requests = opened = closed = 0
        limits = self.limits
        result = BatchResult(rows=[], dead_letters=[], next_offsets={})
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
            native = decode_native(message.value, now, limits)
            if native is not None:
                native_events = native[0]
                sources = [e.source for e in native_events]
                ids = [e.id for e in native_events]
                if message.offset < resume[partition]:
                    result.replayed += 1
                    if dedup.admit_many(sources, ids) is None:
                        for source, event_id in zip(sources, ids, strict=True):
                            first_time(source, event_id)
                    continue
                found = dedup.admit_many(sources, ids)
                if found is None:
                    r, o, c, d = add_native(*native, first_time)
                else:
                    if found:  # the lists are this message's own: drop its duplicates
                        native_times, native_minutes = native[1], native[2]
                        for index in reversed(found):
                            del native_events[index], native_times[index], native_minutes[index]
                    r, o, c, _ = add_native(*native, None)
                    d = len(found)
                requests += r
                opened += o
                closed += c
                duplicates += d
                next_offsets[partition] = resume[partition] = message.offset + 1
                if message.timestamp_ms > published.get(partition, 0):
                    published[partition] = message.timestamp_ms
                else:
                    published.setdefault(partition, 0)
                continue
            events, rejections = decode_flat(message.value, now, limits)
            if message.offset < resume[partition]:
                result.replayed += 1
                for event in events:
                    first_time(event[0], event[1])
                continue
            for rejection in rejections:
                result.dead_letters.append(DeadLetter(rejection, partition, message.offset))
            for event in events:
                if first_time(event[0], event[1]):
                    add(event)
                    counted += 1
                    kind = event[2]
                    by_type[kind] = by_type.get(kind, 0) + 1
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
        result.rows = builder.wire_rows() if wire else builder.rows()
        return result
