"""A bounded, crash-safe disk queue of byte records: where a gateway keeps what Kafka did not take.

Synchronous and single-process. Every public method takes one internal lock, so a caller
may run them in worker threads (the gateway does, with `asyncio.to_thread`) without its
event loop ever waiting on a disk. Layout of the directory:

    lock              held with flock by the owning process, which writes its pid in it
    position          the committed read position: segment, offset, CRC32 (20 bytes)
    00000001.seg ...  segments: an 8-byte magic, then records, appended in order
    quarantine/       bytes cut out during recovery (a torn or corrupt tail), for inspection

A record is `u32 length | u32 CRC32(length bytes + payload) | payload`, little-endian. The
CRC covers the length so that a run of zeros (what some file systems leave after a crash
in blocks they had allocated) never reads as a valid empty record.

Durability, and what it costs:

* `fsync="always"` (the default): `append` returns only once its records are on stable
  storage (fdatasync; plus an fsync of the directory when a segment was created). They
  survive a process kill *and* a power cut. One fsync per `append` call, whatever the
  number of records, so group records into one call: the gateway appends every batch
  waiting at that moment at once. An fsync costs ~0.1-2 ms on a local SSD, 1-10 ms on
  network block storage, far more on a busy spinning disk.
* `fsync="batch"`: `append` returns once the records are written to the operating system.
  They survive the process being killed (SIGKILL, OOM, a crash), not a power cut or a
  kernel panic. The data is fsync'd when `sync_interval_s` passed since the last fsync (at
  the next `append` or `sync_if_due`), when a segment fills, and by `sync` and `close`.
  A power cut can lose what was appended in the last `sync_interval_s`.

The committed position is always replaced atomically (write a temporary file, fsync it,
rename it over the old one, fsync the directory) in `ack`: two fsyncs per call, so ack
a run of records at once. Delivery is at least once: a crash between delivering records
and acking them replays them, so consumers must tolerate duplicates.

Recovery (on open) scans every segment and checks each record. A short or mismatching
record ends its segment: the tail is moved to `quarantine/` and the segment truncated
there. After a crash that is a torn write, expected and harmless; anywhere else it is
disk corruption, logged as an error, and the quarantined bytes are what an operator has
left of those records. Opening never raises because of a damaged record.

Modules: this one is the queue (its index, appending, reading, acking); the files'
formats, the lock and the fsyncs are `producers.spool_files`; recovery at open is
`producers.spool_recovery`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

from producers.exceptions import SpoolError, SpoolLockedError
from producers.spool_files import (
    MAGIC,
    MAX_RECORD_BYTES,
    POSITION_FILE,
    RECORD_HEADER,
    Segment,
    SpoolPosition,
    acquire_lock,
    encode_record,
    fdatasync,
    fsync_dir,
    record_crc,
    release_lock,
    segment_path,
    write_all,
    write_position,
)
from producers.spool_recovery import recover

__all__ = [
    "MAGIC",
    "MAX_RECORD_BYTES",
    "RECORD_HEADER",
    "FsyncPolicy",
    "Spool",
    "SpoolError",
    "SpoolLockedError",
    "SpoolPosition",
    "encode_record",
]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch"]


class Spool:
    """A FIFO of byte records in `directory`, at most `max_bytes` of segment files.

    `append` adds records (all or none; False when they do not fit), `peek` reads the
    oldest unacknowledged ones with their positions, `ack(position)` marks everything up to
    and including that record as delivered (whole segments are then deleted). What was
    appended and not acked is read again after a restart, in the same order.
    """

    def __init__(
        self,
        directory: Path | str,
        max_bytes: int,
        *,
        fsync: FsyncPolicy = "always",
        segment_bytes: int | None = None,
        sync_interval_s: float = 1.0,
    ) -> None:
        if fsync not in ("always", "batch"):
            raise ValueError(f"fsync must be 'always' or 'batch', got {fsync!r}")
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        if sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be > 0, got {sync_interval_s}")
        # Sixteen segments per bound: space comes back in steps of 1/16 of the bound as
        # records are acked, and a segment stays small enough to scan quickly at open.
        chosen = segment_bytes if segment_bytes is not None else max_bytes // 16
        self.segment_bytes: Final = max(min(chosen, 64 * 1024 * 1024), 1024)
        self.directory: Final = Path(directory)
        self.max_bytes: Final = max_bytes
        self.fsync: Final[FsyncPolicy] = fsync
        self.sync_interval_s: Final = sync_interval_s

        self._lock = threading.Lock()
        self._closed = False
        self._segments: list[Segment] = []
        self._read: SpoolPosition | None = None
        """The committed position: records after it are pending. None: nothing on disk."""
        self._records = 0
        self._pending_bytes = 0
        self._disk_bytes = 0
        self._next_number = 1
        self._write_fd: int | None = None
        self._read_fds: dict[int, int] = {}
        self._dirty = False
        self._dir_dirty = False
        self._last_sync = time.monotonic()

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool directory {self.directory}: {exc}. Give the "
                "process write access there, or point the spool elsewhere "
                "(TALLY_PRODUCER_SPOOL_DIR)."
            ) from exc
        self._lock_fd = acquire_lock(self.directory)
        try:
            self._open_recovered()
        except BaseException:
            self._release()
            raise

    def _open_recovered(self) -> None:
        found = recover(self.directory)
        self._segments = found.segments
        self._read = found.read
        self._next_number = found.next_number
        self._records = found.records
        self._pending_bytes = found.pending_bytes
        self._disk_bytes = found.disk_bytes
        if found.read is not None and self._records == 0:
            # Everything was acked: start the next append on a fresh segment.
            self._drop_consumed()

    # -- queries -----------------------------------------------------------------

    def __len__(self) -> int:
        """Records appended and not yet acked."""
        return self._records

    @property
    def bytes_pending(self) -> int:
        """Bytes of the records not yet acked (headers included)."""
        return self._pending_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk: what `max_bytes` bounds."""
        return self._disk_bytes

    @property
    def dirty(self) -> bool:
        """Appended data not yet fsync'd (only ever true with fsync='batch')."""
        return self._dirty or self._dir_dirty

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writing -----------------------------------------------------------------

    def append(self, records: Sequence[bytes]) -> bool:
        """Append `records` in order, all or none. False (nothing written) when full.

        Raises ValueError for a record that could never fit, OSError when the disk fails
        (a full disk counts as full: False).
        """
        with self._lock:
            self._check_open()
            if not records:
                return True
            for record in records:
                if len(record) > MAX_RECORD_BYTES or (
                    len(MAGIC) + RECORD_HEADER.size + len(record) > self.max_bytes
                ):
                    raise ValueError(
                        f"a record of {len(record)} bytes can never fit in the spool at "
                        f"{self.directory} (max_bytes={self.max_bytes}); raise max_bytes"
                    )
            plan = self._plan(records)
            growth = sum(len(chunk) for _, chunk, _ in plan)
            if self._disk_bytes + growth > self.max_bytes:
                return False
            try:
                self._write(plan)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    log.error(
                        "the disk holding the spool %s is full (%s); treating the spool as "
                        "full. Free disk space or lower TALLY_PRODUCER_SPOOL_MAX_BYTES.",
                        self.directory,
                        exc,
                    )
                    return False
                raise
            self._after_write()
            return True

    def sync(self) -> None:
        """fsync what was appended since the last fsync (a no-op with fsync='always')."""
        with self._lock:
            self._check_open()
            self._sync()

    def sync_if_due(self) -> None:
        """`sync` if data is waiting and `sync_interval_s` passed since the last fsync."""
        with self._lock:
            if not self._closed and self.dirty and self._sync_due():
                self._sync()

    # -- reading -----------------------------------------------------------------

    def peek(
        self, max_records: int, max_bytes: int | None = None, *, after: SpoolPosition | None = None
    ) -> list[tuple[SpoolPosition, bytes]]:
        """The oldest pending records with their positions, without consuming them.

        At most `max_records`, and no more than `max_bytes` of records (headers included)
        except that the first record is always returned. `after`: read from that position
        instead of the committed one (to page through the spool).
        """
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        with self._lock:
            self._check_open()
            start = after if after is not None else self._read
            if start is None or not self._segments:
                return []
            index = self._segment_index(start.segment)
            if index is None:
                if start.segment < self._segments[0].number:
                    raise ValueError(f"{start} was already acked")
                return []
            offset = start.offset
            out: list[tuple[SpoolPosition, bytes]] = []
            budget = max_bytes
            while index < len(self._segments) and len(out) < max_records:
                segment = self._segments[index]
                first = last = bisect_right(segment.ends, offset)
                begin = previous = segment.ends[first - 1] if first else len(MAGIC)
                over = False
                while last < len(segment.ends) and len(out) + (last - first) < max_records:
                    size = segment.ends[last] - previous
                    if budget is not None:
                        if size > budget and (out or last > first):
                            over = True
                            break
                        budget -= size
                    previous = segment.ends[last]
                    last += 1
                if last > first:
                    out.extend(self._read_records(segment, begin, segment.ends[first:last]))
                if over:
                    break
                index += 1
                offset = len(MAGIC)
            return out

    def ack(self, position: SpoolPosition) -> None:
        """Everything up to and including the record ending at `position` was delivered.

        Acking an already acked position does nothing; acking one that was never returned
        by `peek` raises ValueError. Fully acked segments are deleted.
        """
        with self._lock:
            self._check_open()
            read = self._read
            if read is None or position <= read:
                return
            index = self._segment_index(position.segment)
            if index is None or not _is_end(self._segments[index].ends, position.offset):
                raise ValueError(
                    f"{position} is not the end of a record in the spool at {self.directory}"
                )
            consumed, consumed_bytes = 0, 0
            for segment in self._segments[: index + 1]:
                low = read.offset if segment.number == read.segment else len(MAGIC)
                high = position.offset if segment.number == position.segment else segment.size
                consumed += bisect_right(segment.ends, high) - bisect_right(segment.ends, low)
                consumed_bytes += high - low
            write_position(self.directory, position)
            self._read = position
            self._records -= consumed
            self._pending_bytes -= consumed_bytes
            self._drop_consumed()

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """fsync, release the directory. An empty spool's files are removed too."""
        with self._lock:
            if self._closed:
                return
            try:
                if self.dirty:
                    self._sync()
                empty = self._records == 0
                self._close_fds()
                if empty:
                    self._remove_files()
            finally:
                self._closed = True
                self._release(remove_lock_file=self._records == 0)
        if self._records == 0:
            # Only succeeds when nothing else (quarantine, undeliverable events) is there.
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Spool({str(self.directory)!r}, records={self._records}, "
            f"disk_bytes={self._disk_bytes}, max_bytes={self.max_bytes})"
        )

    # -- internals: writing ------------------------------------------------------

    def _plan(self, records: Sequence[bytes]) -> list[tuple[int, bytes, array[int]]]:
        """(segment number, bytes to write, record end offsets) per touched segment."""
        plan: list[tuple[int, bytes, array[int]]] = []
        head = self._segments[-1] if self._segments else None
        number = head.number if head is not None else None
        size = head.size if head is not None else 0
        fresh = self._next_number
        parts: list[bytes] = []
        ends: array[int] = array("q")
        for record in records:
            need = RECORD_HEADER.size + len(record)
            if number is None or (size + need > self.segment_bytes and size > len(MAGIC)):
                if parts:
                    assert number is not None
                    plan.append((number, b"".join(parts), ends))
                number, fresh = fresh, fresh + 1
                size = len(MAGIC)
                parts, ends = [MAGIC], array("q")
            parts.append(encode_record(record))
            size += need
            ends.append(size)
        assert number is not None
        plan.append((number, b"".join(parts), ends))
        return plan

    def _write(self, plan: list[tuple[int, bytes, array[int]]]) -> None:
        """Write the plan; on any error, undo it completely and re-raise."""
        head = self._segments[-1] if self._segments else None
        old_head_size = head.size if head is not None else 0
        created: list[Path] = []
        try:
            for number, chunk, _ in plan:
                if head is not None and number == head.number:
                    fd = self._head_fd(head)
                    write_all(fd, chunk)
                    continue
                if self._write_fd is not None:
                    # The previous head is complete: make it durable before moving on, so
                    # only the last segment can ever have a torn tail.
                    fdatasync(self._write_fd)
                    os.close(self._write_fd)
                    self._write_fd = None
                path = self._segment_path(number)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
                created.append(path)
                self._write_fd = fd
                write_all(fd, chunk)
            if self.fsync == "always":
                assert self._write_fd is not None
                fdatasync(self._write_fd)
                if created:
                    fsync_dir(self.directory)
        except OSError:
            self._undo(head, old_head_size, created)
            raise
        # Only now that every byte is written does the index learn about the records.
        for number, chunk, ends in plan:
            if head is not None and number == head.number:
                head.ends.extend(ends)
                head.size += len(chunk)
                self._pending_bytes += len(chunk)
            else:
                self._segments.append(Segment(number, self._segment_path(number), len(chunk), ends))
                self._next_number = number + 1
                if self._read is None:
                    self._read = SpoolPosition(number, len(MAGIC))
                self._pending_bytes += len(chunk) - len(MAGIC)
            self._records += len(ends)
            self._disk_bytes += len(chunk)
        if created:
            self._dir_dirty = self.fsync == "batch"
        self._dirty = self.fsync == "batch"

    def _undo(self, head: Segment | None, old_size: int, created: list[Path]) -> None:
        with contextlib.suppress(OSError):
            if self._write_fd is not None:
                os.close(self._write_fd)
        self._write_fd = None
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        if head is not None:
            with contextlib.suppress(OSError):
                os.truncate(head.path, old_size)

    def _after_write(self) -> None:
        if self.fsync == "batch" and self._sync_due():
            self._sync()
        elif self.fsync == "always":
            self._last_sync = time.monotonic()

    def _sync_due(self) -> bool:
        return time.monotonic() - self._last_sync >= self.sync_interval_s

    def _sync(self) -> None:
        if self._dirty and self._write_fd is not None:
            fdatasync(self._write_fd)
        if self._dir_dirty:
            fsync_dir(self.directory)
        self._dirty = self._dir_dirty = False
        self._last_sync = time.monotonic()

    def _head_fd(self, head: Segment) -> int:
        if self._write_fd is None:
            self._write_fd = os.open(head.path, os.O_WRONLY | os.O_APPEND)
        return self._write_fd

    def _drop_consumed(self) -> None:
        """Delete segments whose every record is acked, and the head too once all is."""
        read = self._read
        assert read is not None
        while self._segments:
            first = self._segments[0]
            if first.number > read.segment:
                break
            fully = first.number < read.segment or read.offset >= first.size
            if not fully:
                break
            is_head = len(self._segments) == 1
            if is_head and self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None
                self._dirty = False
            self._forget(first)
            with contextlib.suppress(FileNotFoundError):
                first.path.unlink()
            self._segments.pop(0)
            self._disk_bytes -= first.size
            if self._segments:
                if first.number == read.segment:
                    self._read = read = SpoolPosition(self._segments[0].number, len(MAGIC))
            else:
                # Empty: the next append starts a fresh segment with a higher number (the
                # position file keeps the old one, so numbers never go back).
                self._read = None

    # -- internals: reading ------------------------------------------------------

    def _segment_path(self, number: int) -> Path:
        return segment_path(self.directory, number)

    def _segment_index(self, number: int) -> int | None:
        for index, segment in enumerate(self._segments):
            if segment.number == number:
                return index
        return None

    def _read_records(
        self, segment: Segment, begin: int, ends: array[int]
    ) -> list[tuple[SpoolPosition, bytes]]:
        fd = self._read_fds.get(segment.number)
        if fd is None:
            fd = self._read_fds[segment.number] = os.open(segment.path, os.O_RDONLY)
        data = os.pread(fd, ends[-1] - begin, begin)
        out: list[tuple[SpoolPosition, bytes]] = []
        view = memoryview(data)
        at = 0
        for end in ends:
            length, crc = RECORD_HEADER.unpack_from(view, at)
            payload = view[at + RECORD_HEADER.size : end - begin]
            if len(payload) != length or record_crc(view[at : at + 4].tobytes(), payload) != crc:
                raise SpoolError(
                    f"the record ending at offset {end} of {segment.path} no longer matches "
                    "its checksum: the file was changed behind the spool's back or the disk "
                    "is failing. Stop the process, move that file aside, and restart (it "
                    "recovers what precedes the damage)."
                )
            out.append((SpoolPosition(segment.number, end), bytes(payload)))
            at = end - begin
        return out

    def _forget(self, segment: Segment) -> None:
        fd = self._read_fds.pop(segment.number, None)
        if fd is not None:
            os.close(fd)

    # -- internals: recovery -----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"the spool at {self.directory} is closed")

    def _close_fds(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    def _remove_files(self) -> None:
        for segment in self._segments:
            segment.path.unlink(missing_ok=True)
        self._segments.clear()
        self._disk_bytes = 0
        (self.directory / POSITION_FILE).unlink(missing_ok=True)

    def _release(self, *, remove_lock_file: bool = False) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            release_lock(self.directory, fd, remove_lock_file=remove_lock_file)


def _is_end(ends: array[int], offset: int) -> bool:
    index = bisect_left(ends, offset)
    return index < len(ends) and ends[index] == offset
