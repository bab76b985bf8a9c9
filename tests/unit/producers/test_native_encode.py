"""The gateway's native encoder (native/src/encode.rs) writes what encode_event writes.

Its reference is `encode_event`: the same JSON object for every event it takes (floats
may be spelt differently, and decode to the same float), and for everything else it
declines and leaves the message as it was, so that Python writes that event.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers import events
from producers.events import batch_encoder, encode_event
from producers.partitioning import murmur2, partition_for
from schemas.events import EVENT_ADAPTER, AnyEvent, RequestData, RequestEvent
from tests.unit.producers.test_encode_events import _events

tally_fold = pytest.importorskip("tally_fold")
BatchEncoder = tally_fold.BatchEncoder

MAX = 900_000


def encode(batch: list[AnyEvent], max_bytes: int = MAX) -> tuple[bytes, int]:
    encoder = batch_encoder(1, max_bytes)
    assert encoder is not None
    for event in batch:
        assert encoder.add(event) > 0
    return encoder.take(0)


def utc(event: AnyEvent) -> AnyEvent:
    return event.model_copy(update={"time": event.time.astimezone(UTC)})


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, min_size=1, max_size=5))
def test_each_event_is_the_json_encode_event_writes(batch: list[AnyEvent]) -> None:
    batch = [utc(e) for e in batch]
    value, count = encode(batch)
    assert count == len(batch)
    assert orjson.loads(value) == [orjson.loads(encode_event(e)) for e in batch]
    assert [EVENT_ADAPTER.validate_python(doc) for doc in orjson.loads(value)] == batch


def test_bytes_are_encode_events_own_when_floats_are_spelt_alike() -> None:
    now = datetime(2026, 11, 22, 15, 4, 5, 6, tzinfo=UTC)
    batch: list[AnyEvent] = [
        events.request("acct-1", "gw", units=2.5, route='/v1/"q"\\é\n\x00', status=200,
                       latency_ms=12.25, bytes_in=0, bytes_out=2**63 - 1, time=now, id="a"),
        events.stream_opened("acct-1", "gw", "s1", model="m😀", time=now.replace(microsecond=0)),
        events.stream_closed("acct-1", "gw", "s1", units=0.1, duration_ms=1e12, reason="done",
                             time=now.replace(year=1), id="c"),
        events.request("acct-1", "gw", time=datetime(9999, 12, 31, 23, 59, 59, 999_999, UTC)),
    ]  # fmt: skip
    value, _ = encode(batch)
    # encode_event orders the keys as written there; the encoder as the models do.
    expected = [orjson.loads(encode_event(e)) for e in batch]
    in_model_order = [
        {k: doc[k] for k in e.__dict__ if k in doc} for doc, e in zip(expected, batch, strict=True)
    ]
    assert value == orjson.dumps(in_model_order)


@pytest.mark.parametrize(
    "units", [0.0, 5e-324, 1e-7, 0.1, 1 / 3, 123456.0, 999_999_999_999.9999, 1e12]
)
def test_floats_decode_to_the_same_float(units: float) -> None:
    event = events.request("acct-1", "gw", units=units, latency_ms=units)
    value, _ = encode([event])
    (doc,) = orjson.loads(value)
    assert doc["data"]["units"] == units
    assert math.copysign(1, doc["data"]["units"]) == 1
    assert EVENT_ADAPTER.validate_python(doc) == event


@pytest.mark.parametrize("latency", [1e15, 1e16, 2.0**53 + 2, 1.5e300, -0.0, -2.5])
def test_floats_beyond_the_models_bounds_too(latency: float) -> None:
    # Built without validation: written all the same, as orjson would.
    value, _ = encode([construct(latency_ms=latency)])
    written = orjson.loads(value)[0]["data"]["latency_ms"]
    assert written == latency
    assert math.copysign(1, written) == math.copysign(1, latency)


def construct(**data: Any) -> RequestEvent:
    return events.request("acct-1", "gw").model_copy(
        update={"data": RequestData.model_construct(units=1.0, **data)}
    )


class Sub(RequestEvent):
    pass


@pytest.mark.parametrize(
    "event",
    [
        events.request("acct-1", "gw", time=datetime.now(timezone(timedelta(hours=2)))),
        # A fixed zero offset that is not the UTC singleton: Python writes it.
        events.request("acct-1", "gw", time=datetime.now(timezone(timedelta(0), "GMT"))),
        construct(bytes_in=2**64),
        construct(bytes_in=-(2**63) - 1),
        construct(latency_ms=float("nan")),
        construct(latency_ms=float("inf")),
        construct(route="\ud800"),
        construct(route=b"bytes"),
        construct(route=["a"]),
        construct(status=200.0 + 0j),
        Sub.model_validate(events.request("acct-1", "gw").model_dump()),
        object(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_it_does_not_write_is_declined_and_nothing_is_added(event: Any) -> None:
    encoder = batch_encoder(1, MAX)
    assert encoder is not None
    first = events.request("acct-1", "gw", id="first")
    assert encoder.add(first) == 1
    assert encoder.add(event) == BatchEncoder.UNSUPPORTED
    assert encoder.count(0) == 1
    value, count = encoder.take(0)
    assert (orjson.loads(value), count) == ([orjson.loads(encode_event(first))], 1)


def test_ints_within_64_bits_both_signs_are_written() -> None:
    event = construct(bytes_in=2**64 - 1, bytes_out=-(2**63), status=True)
    value, _ = encode([event])
    assert orjson.loads(value)[0]["data"] == orjson.loads(encode_event(event))["data"]


def test_a_message_never_exceeds_max_bytes() -> None:
    event = events.request("acct-1", "gw", id="x")
    one = len(encode_event(event))
    max_bytes = 2 + one * 3 + 2  # brackets, three events and two commas
    encoder = batch_encoder(1, max_bytes)
    assert encoder is not None
    assert [encoder.add(event) for _ in range(4)] == [1, 2, 3, BatchEncoder.FULL]
    value, count = encoder.take(0)
    assert (len(value), count) == (max_bytes, 3)
    assert encoder.take(0) == (b"", 0)
    assert encoder.count(0) == 0
    # Alone and still too large: refused whatever the message holds.
    small = batch_encoder(1, one + 1)
    assert small is not None
    assert small.add(event) == BatchEncoder.TOO_LARGE
    assert small.add_raw(0, encode_event(event)) == BatchEncoder.TOO_LARGE
    assert small.take(0) == (b"", 0)


def test_raw_events_keep_their_place_in_the_message() -> None:
    encoder = batch_encoder(1, MAX)
    assert encoder is not None
    a, b, c = (events.request("acct-1", "gw", id=i) for i in "abc")
    assert encoder.add(a) == 1
    assert encoder.add_raw(0, encode_event(b)) == 2
    assert encoder.add(c) == 3
    value, _ = encoder.take(0)
    assert [d["id"] for d in orjson.loads(value)] == ["a", "b", "c"]


@pytest.mark.parametrize("partitions", [1, 7, 12])
def test_each_event_goes_to_its_subjects_partition(partitions: int) -> None:
    encoder = batch_encoder(partitions, MAX)
    assert encoder is not None
    rng = random.Random(partitions)
    subjects = [f"acct-{rng.randrange(10**6)}" for _ in range(2_000)] + ["a", "Z.9:_-"]
    for n, subject in enumerate(subjects):
        assert encoder.add(events.request(subject, "gw", id=str(n))) > 0
        assert encoder.last == partition_for(subject, partitions)
    placed = {
        doc["subject"]: p
        for p in range(partitions)
        for doc in orjson.loads(encoder.take(p)[0] or b"[]")
    }
    assert placed == {s: partition_for(s, partitions) for s in subjects}


def test_a_partition_out_of_range_is_an_index_error() -> None:
    encoder = batch_encoder(3, MAX)
    assert encoder is not None
    with pytest.raises(IndexError, match="partition 3 out of range"):
        encoder.add_raw(3, b"{}")
    with pytest.raises(IndexError):
        encoder.take(7)
    with pytest.raises(ValueError, match="at least 1"):
        batch_encoder(0, MAX)


def test_native_murmur2_is_kafkas() -> None:
    rng = random.Random(5)
    keys = [rng.randbytes(rng.randrange(0, 64)) for _ in range(5_000)]
    keys += ["acct-é".encode(), b"", b"a", b"ab", b"abc", b"abcd"]
    assert [tally_fold.murmur2(k) for k in keys] == [murmur2(k) for k in keys]
