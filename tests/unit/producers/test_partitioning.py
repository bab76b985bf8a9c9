"""partition_for must agree with the Java client's default partitioner, byte for byte."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from producers import partitioning
from producers.partitioning import partition_for, subject_hash

# Computed with kafka-clients 4.3.0 (the broker's jars): Utils.murmur2(key.getBytes(UTF_8))
# and Utils.toPositive(h) % n. The first six are also Kafka's own UtilsTest vectors.
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
    "acct-000000": 377336238,
    "acct-000001": -699117642,
    "acct-000042": 1232532346,
    "acct-123456": -1460962867,
    "org:team.alpha_1": 519206499,
    "x": 2121525046,
    "é-not-ascii-ü": 24458502,
    "ACCOUNT-with-Mixed.Case:42": -1094221359,
}

# key -> (partition of 8, of 12, of 64), from the same Java run.
JAVA_PARTITIONS = {
    "21": (4, 0, 44),
    "foobar": (6, 6, 62),
    "a-little-bit-long-string": (0, 8, 32),
    "a-little-bit-longer-string": (3, 11, 3),
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": (5, 5, 13),
    "abc": (3, 3, 27),
    "acct-000000": (6, 6, 46),
    "acct-000001": (6, 2, 54),
    "acct-000042": (2, 10, 58),
    "acct-123456": (5, 1, 13),
    "org:team.alpha_1": (3, 3, 35),
    "x": (6, 10, 54),
    "é-not-ascii-ü": (6, 6, 6),
    "ACCOUNT-with-Mixed.Case:42": (1, 5, 17),
}

subjects = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)


@pytest.mark.parametrize(("key", "signed"), sorted(JAVA_MURMUR2.items()))
def test_murmur2_matches_java(key: str, signed: int) -> None:
    assert murmur2(key.encode()) & 0xFFFFFFFF == signed & 0xFFFFFFFF
    assert subject_hash(key) == signed & 0x7FFFFFFF


@pytest.mark.parametrize(("key", "expected"), sorted(JAVA_PARTITIONS.items()))
def test_partition_matches_java(key: str, expected: tuple[int, int, int]) -> None:
    assert (partition_for(key, 8), partition_for(key, 12), partition_for(key, 64)) == expected


def test_one_partition_is_always_zero() -> None:
    assert {partition_for(k, 1) for k in JAVA_MURMUR2} == {0}


@pytest.mark.parametrize("bad", [0, -1])
def test_rejects_a_partition_count_below_one(bad: int) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        partition_for("acct-1", bad)


@given(subject=subjects, n=st.integers(min_value=1, max_value=1_000))
def test_in_range_stable_and_same_as_aiokafka(subject: str, n: int) -> None:
    p = partition_for(subject, n)
    assert 0 <= p < n
    assert partition_for(subject, n) == p
    # What aiokafka's producer does for a keyed send without an explicit partition.
    partitions = list(range(n))
    assert DefaultPartitioner()(subject.encode(), partitions, partitions) == p


def test_cache_is_bounded() -> None:
    info = subject_hash.cache_info()
    assert info.maxsize is not None
    assert info.maxsize <= 1_000_000


@pytest.mark.parametrize(("key", "signed"), sorted(JAVA_MURMUR2.items()))
def test_own_murmur2_matches_java(key: str, signed: int) -> None:
    assert partitioning.murmur2(key.encode()) == signed & 0xFFFFFFFF


def test_own_murmur2_equals_aiokafkas_on_random_keys() -> None:
    # Every length 0..300 (so every tail length 0..3 with every word count), random
    # bytes (high bits set: the sign of Java's bytes) and random non-ASCII text.
    rng = random.Random(20260322)
    keys = [b""]
    for length in range(301):
        for _ in range(20):
            keys.append(rng.randbytes(length))
        text = "".join(
            chr(rng.choice((rng.randrange(32, 0x800), rng.randrange(0x800, 0x10FFFF))))
            for _ in range(length // 3)
        )
        keys.append(text.encode("utf-8", "surrogatepass"))
    keys += [b"\xff" * n for n in range(16)] + [b"\x00" * n for n in range(16)]
    for key in keys:
        assert partitioning.murmur2(key) == murmur2(key) & 0xFFFFFFFF, key


@given(
    key=st.binary(max_size=300)
    | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_own_murmur2_equals_aiokafkas(key: bytes) -> None:
    assert partitioning.murmur2(key) == murmur2(key) & 0xFFFFFFFF
