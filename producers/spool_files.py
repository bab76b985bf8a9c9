"""The spool's files: record framing, the committed-position file, the directory lock,
and the fsyncs that make writes durable (see `producers.spool` for the layout)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

from producers.exceptions import SpoolLockedError

log = logging.getLogger("producers.spool")

MAGIC: Final = b"TLYSPL01"
"""The first bytes of every segment file (format version 1)."""
RECORD_HEADER: Final = struct.Struct("<II")
MAX_RECORD_BYTES: Final = 256 * 1024 * 1024
"""Longest payload; a longer length read back from disk can only be corruption."""
_POSITION: Final = struct.Struct("<QQI")
LOCK_FILE: Final = "lock"
POSITION_FILE: Final = "position"
SUFFIX: Final = ".seg"


class SpoolPosition(NamedTuple):
    """Where a record ends: its segment number and the byte offset just past it."""

    segment: int
    offset: int


@dataclass(slots=True)
class Segment:
    number: int
    path: Path
    size: int
    ends: array[int] = field(default_factory=lambda: array("q"))
    """End offsets of the records in the file, ascending."""


def record_crc(length: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(length))


def encode_record(payload: bytes) -> bytes:
    """The bytes `append` writes for one payload (exposed for tests and tools)."""
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", record_crc(length, payload)) + payload


def fdatasync(fd: int) -> None:
    # fdatasync skips the inode's timestamps but still flushes a grown size, which is all a
    # reader after a crash needs. macOS lacks it; its fsync does not flush the drive cache
    # either (F_FULLFSYNC would), a known weakness of that platform.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:08d}{SUFFIX}"


def write_position(directory: Path, position: SpoolPosition) -> None:
    """Replace the committed position atomically: a temporary file, fsync'd, renamed."""
    body = struct.pack("<QQ", position.segment, position.offset)
    data = body + struct.pack("<I", zlib.crc32(body))
    tmp = directory / (POSITION_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / POSITION_FILE)
    fsync_dir(directory)


def read_position(directory: Path) -> SpoolPosition | None:
    """The committed position; None when there is none or it is damaged."""
    path = directory / POSITION_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) == _POSITION.size:
        segment, offset, checksum = _POSITION.unpack(data)
        if zlib.crc32(data[:16]) == checksum:
            return SpoolPosition(segment, offset)
    log.warning(
        "the spool's committed position %s is damaged; replaying the spool from its "
        "oldest record (already delivered events are sent again, counted once)",
        path,
    )
    return None


def acquire_lock(directory: Path) -> int:
    """flock the directory's lock file and write our pid in it; the locked fd."""
    path = directory / LOCK_FILE
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # A closing sibling removed the (then empty) parent directories meanwhile.
            directory.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise SpoolLockedError(
                f"the spool directory {directory} is in use by {who}. Each gateway process "
                "needs a spool of its own: give this one another directory "
                "(TALLY_PRODUCER_SPOOL_DIR, or a distinct client_id for the default), or stop "
                "the other. If no such process runs, its lock died with it and this is a "
                "second Gateway with the same spool inside this process."
            ) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # The previous owner removed the lock file between our open and flock.
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    raise SpoolLockedError(f"could not lock the spool directory {directory}: it keeps changing")


def release_lock(directory: Path, fd: int, *, remove_lock_file: bool) -> None:
    """Give up the lock taken by `acquire_lock`."""
    if remove_lock_file:
        # Unlinked while still locked: a process that opened the old file meanwhile
        # notices (the inode check in acquire_lock) and takes a fresh one.
        with contextlib.suppress(OSError):
            (directory / LOCK_FILE).unlink()
    os.close(fd)
