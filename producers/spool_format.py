"""How the gateway writes a batch into its spool (`producers.spool` stores the bytes),
and where it puts batches Kafka refuses for good.

One spool record per batch: format, batch id, the topic's partition count when it was
spooled, partition (-1: by key), key length, event count; then the key, then each event
as u32 length + bytes. Little-endian.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from producers.batches import Batch
from producers.spool import Spool, SpoolPosition

SPOOL_FORMAT: Final = 1
_RECORD_HEAD: Final = struct.Struct("<BQiiHI")
_EVENT_LENGTH: Final = struct.Struct("<I")
UNDELIVERABLE: Final = "undeliverable.jsonl"
"""Next to the spool: events of spooled batches Kafka refused for good, one a line."""


@dataclass(frozen=True, slots=True)
class Spooled:
    batch_id: int
    partitions: int
    """The topic's partition count when the batch was spooled."""
    batch: Batch


def encode_spooled(batch_id: int, partitions: int, batch: Batch) -> bytes:
    partition = -1 if batch.partition is None else batch.partition
    parts = [
        _RECORD_HEAD.pack(
            SPOOL_FORMAT, batch_id, partitions, partition, len(batch.key), len(batch.events)
        ),
        batch.key,
    ]
    for event in batch.events:
        parts.append(_EVENT_LENGTH.pack(len(event)))
        parts.append(event)
    return b"".join(parts)


def decode_spooled(data: bytes) -> Spooled:
    """Raises ValueError for a record of another format, or malformed."""
    try:
        version, batch_id, partitions, partition, key_length, count = _RECORD_HEAD.unpack_from(data)
        if version != SPOOL_FORMAT:
            raise ValueError(f"spool record format {version}, expected {SPOOL_FORMAT}")
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
    return Spooled(batch_id, partitions, Batch(None if partition < 0 else partition, key, events))


def _spooled_events(data: bytes) -> int:
    try:
        version, _, _, _, _, count = _RECORD_HEAD.unpack_from(data)
    except struct.error:
        return 0
    return int(count) if version == SPOOL_FORMAT else 0


def count_events(spool: Spool) -> int:
    """Events in every pending record of `spool` (reads it all: at start only)."""
    total = 0
    after: SpoolPosition | None = None
    while page := spool.peek(1_024, 64 * 1024 * 1024, after=after):
        total += sum(_spooled_events(data) for _, data in page)
        after = page[-1][0]
    return total


def write_undeliverable(
    directory: Path, position: SpoolPosition, spooled: Spooled | None, raw: bytes
) -> Path:
    """Keep a refused record next to the spool: its events, or (not decodable) its bytes."""
    if spooled is None:
        target = directory / f"undeliverable-{position.segment}-{position.offset}.bin"
        target.write_bytes(raw)
    else:
        target = directory / UNDELIVERABLE
        with target.open("ab") as f:
            f.write(b"".join(event + b"\n" for event in spooled.batch.events))
            f.flush()
            os.fsync(f.fileno())
    return target
