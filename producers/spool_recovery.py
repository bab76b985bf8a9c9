"""Recovery: what a spool directory holds when a Spool opens it, after a clean close, a
crash, a power cut or disk damage.

Every segment is scanned and each record checked. A short or mismatching record ends
its segment: the tail is moved to `quarantine/` and the segment truncated there. After a
crash that is a torn write, expected and harmless; anywhere else it is disk corruption,
logged as an error, and the quarantined bytes are what an operator has left of those
records. Recovery never raises because of a damaged record.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from producers.spool_files import (
    MAGIC,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    SUFFIX,
    Segment,
    SpoolPosition,
    read_position,
    record_crc,
    segment_path,
)

log = logging.getLogger("producers.spool")

_QUARANTINE: Final = "quarantine"


@dataclass(slots=True)
class Recovered:
    """The spool's index as found on disk."""

    segments: list[Segment] = field(default_factory=list)
    read: SpoolPosition | None = None
    """The committed position, snapped to a record boundary; None: no segment."""
    next_number: int = 1
    records: int = 0
    pending_bytes: int = 0
    disk_bytes: int = 0


def recover(directory: Path) -> Recovered:
    """Index `directory`'s segments, deleting acked ones and cutting damaged tails."""
    committed = read_position(directory)
    for leftover in directory.glob("*.tmp"):
        leftover.unlink(missing_ok=True)
    numbers = sorted(
        int(p.name[: -len(SUFFIX)])
        for p in directory.glob("*" + SUFFIX)
        if p.name[: -len(SUFFIX)].isdigit()
    )
    floor = committed.segment if committed is not None else 0
    found = Recovered()
    for number in numbers:
        path = segment_path(directory, number)
        if number < floor:
            # Acked; the process stopped between writing the position and deleting.
            path.unlink(missing_ok=True)
            continue
        segment = _scan(directory, number, path, last=number == numbers[-1])
        if segment is not None:
            found.segments.append(segment)
    found.next_number = max([floor, *numbers]) + 1
    if not found.segments:
        return found
    first = found.segments[0]
    if committed is not None and committed.segment == first.number:
        # Snap to a record boundary at or before the committed offset: a position
        # beyond what survived a power cut, or a damaged one, replays (duplicates)
        # instead of skipping.
        offset = len(MAGIC)
        index = bisect_right(first.ends, committed.offset)
        if index:
            offset = first.ends[index - 1]
        read = SpoolPosition(first.number, offset)
    else:
        read = SpoolPosition(first.number, len(MAGIC))
    found.read = read
    for segment in found.segments:
        low = read.offset if segment.number == read.segment else len(MAGIC)
        found.records += len(segment.ends) - bisect_right(segment.ends, low)
        found.pending_bytes += segment.size - low
        found.disk_bytes += segment.size
    return found


def _scan(directory: Path, number: int, path: Path, *, last: bool) -> Segment | None:
    """Index a segment's valid records; cut (and quarantine) what follows the first bad one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(len(MAGIC))
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            # Created, crashed before the magic was written: holds no record.
            path.unlink()
            return None
        if magic != MAGIC:
            _quarantine(directory, path, 0, size, "does not start with the spool's magic")
            path.unlink()
            return None
        segment = Segment(number, path, size)
        at = len(MAGIC)
        while at < size:
            header = f.read(RECORD_HEADER.size)
            if len(header) < RECORD_HEADER.size:
                break
            length, crc = RECORD_HEADER.unpack(header)
            if length > MAX_RECORD_BYTES or at + RECORD_HEADER.size + length > size:
                break
            payload = f.read(length)
            if record_crc(header[:4], payload) != crc:
                break
            at += RECORD_HEADER.size + length
            segment.ends.append(at)
    if at < size:
        why = "torn tail (interrupted write)" if last else "corrupt record"
        _quarantine(directory, path, at, size, why, error=not last)
        with path.open("r+b") as f:
            f.truncate(at)
            os.fsync(f.fileno())
        segment.size = at
    if len(segment.ends) == 0 and not last:
        path.unlink()
        return None
    return segment


def _quarantine(
    directory: Path, path: Path, start: int, end: int, why: str, *, error: bool = False
) -> None:
    target_dir = directory / _QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f"{path.name}.{start}.bin"
    with path.open("rb") as src, target.open("wb") as dst:
        src.seek(start)
        dst.write(src.read(end - start))
        dst.flush()
        os.fsync(dst.fileno())
    if error:
        log.error(
            "spool segment %s: %s at offset %d; the %d bytes from there on (records that "
            "are no longer replayed) were moved to %s for inspection",
            path,
            why,
            start,
            end - start,
            target,
        )
    else:
        log.warning(
            "spool segment %s: %s at offset %d; cut %d bytes (kept in %s)",
            path,
            why,
            start,
            end - start,
            target,
        )


# -- internals: lifecycle ----------------------------------------------------
