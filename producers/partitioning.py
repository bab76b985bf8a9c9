"""Which partition an account's events belong to (docs/api.md#partitioning), computed client-side.

Every event of one account must land where Kafka's default partitioner puts
key = subject, so the producer library can batch co-partitioned events and still
agree with gateways that just send single keyed events: `toPositive(murmur2(key))
% partitions`, exactly as the Java client (and aiokafka's default partitioner).
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Final

try:
    # Kafka's murmur2 in native code (native/src/encode.rs, built by `make setup`): the
    # pure-Python one below costs ~3 µs a subject, which in the bench (100k subjects
    # over 1M events) was 0.3 µs of every recorded event.
    from tally_fold import murmur2 as _native_murmur2
except ImportError:  # pragma: no cover - a checkout installed without native/
    _native_murmur2 = None  # type: ignore[assignment]

# A gateway sees the same few thousand hot accounts over and over, so remember
# their hashes. Bounded, so a flood of distinct subjects costs CPU but never
# unbounded memory.
_CACHE_SIZE = 65_536


_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2(data)` as an unsigned 32-bit int: aiokafka's result, faster.

    aiokafka's pure-Python version assembles each 4-byte word from single bytes and
    masks after every step; here one struct call reads all the words and each product
    is masked once (tests/unit/producers/test_partitioning.py checks equality on many
    random keys). 100k distinct subjects (the bench) each pay one call.
    """
    length = len(data)
    h = (_SEED ^ length) & _MASK
    words = length >> 2
    if words:
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * _M) & _MASK
            k = ((k ^ (k >> 24)) * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        at = length - tail
        if tail == 3:
            h ^= data[at + 2] << 16
        if tail >= 2:
            h ^= data[at + 1] << 8
        h = ((h ^ data[at]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


_murmur2: Final = _native_murmur2 if _native_murmur2 is not None else murmur2


@lru_cache(maxsize=_CACHE_SIZE)
def subject_hash(subject: str) -> int:
    """Java's `Utils.toPositive(Utils.murmur2(subject.getBytes(UTF_8)))`."""
    return _murmur2(subject.encode("utf-8")) & 0x7FFFFFFF


def partition_for(subject: str, num_partitions: int) -> int:
    """The partition Kafka's default partitioner picks for key = `subject`."""
    if num_partitions < 1:
        raise ValueError(
            f"num_partitions must be at least 1, got {num_partitions}: "
            "pass the topic's partition count"
        )
    return subject_hash(subject) % num_partitions
