"""Which partition an account's events belong to (CONTRACT §1), computed client-side.

Every event of one account must land where Kafka's default partitioner puts
key = subject, so the producer library can batch co-partitioned events and still
agree with gateways that just send single keyed events: `toPositive(murmur2(key))
% partitions`, exactly as the Java client (and aiokafka's default partitioner).
"""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2

# aiokafka's murmur2 is pure Python (~2 µs for a short key); a gateway sees the
# same few thousand hot accounts over and over, so remember their hashes. Bounded,
# so a flood of distinct subjects costs CPU but never unbounded memory.
_CACHE_SIZE = 65_536


@lru_cache(maxsize=_CACHE_SIZE)
def subject_hash(subject: str) -> int:
    """Java's `Utils.toPositive(Utils.murmur2(subject.getBytes(UTF_8)))`."""
    return int(murmur2(subject.encode("utf-8"))) & 0x7FFFFFFF


def partition_for(subject: str, num_partitions: int) -> int:
    """The partition Kafka's default partitioner picks for key = `subject`."""
    if num_partitions < 1:
        raise ValueError(
            f"num_partitions must be at least 1, got {num_partitions}: "
            "pass the topic's partition count"
        )
    return subject_hash(subject) % num_partitions
