from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from processors.rollup import RollupBuilder
from producers import events as build
from schemas.deltas import Delta, decode, encode, encode_wire, read, store_rows

T0 = datetime(2026, 3, 29, 10, 15, 42, 123000, tzinfo=UTC)


def _rows(n: int) -> list[list[object]]:
    builder = RollupBuilder()
    for i in range(n):
        builder.add(build.request(f"acct-{i}", "gw", units=1.5, route="/v1/x", time=T0))
    builder.add(build.stream_closed("acct-0", "gw", "s-1", units=2.0, time=T0))
    return store_rows(builder.wire_rows())


def test_round_trip_keeps_every_column_exactly() -> None:
    rows = _rows(3)
    [message] = encode(Delta(4, 1234, 1_774_000_000_123, rows))
    back = decode(message)
    assert (back.partition, back.next_offset, back.reflected_ms) == (4, 1234, 1_774_000_000_123)
    assert back.rows == rows


def test_large_deltas_split_under_the_byte_limit_and_lose_nothing() -> None:
    rows = _rows(5_000)
    messages = encode(Delta(0, 10, 0, rows), max_bytes=50_000)
    assert len(messages) > 1
    assert all(len(m) <= 50_000 for m in messages)
    assert [row for m in messages for row in decode(m).rows] == rows
    assert [decode(m).final for m in messages] == [False] * (len(messages) - 1) + [True]


@pytest.mark.parametrize("max_bytes", [700_000, 20_000])
def test_the_workers_wire_rows_encode_to_the_same_bytes_as_store_rows(max_bytes: int) -> None:
    # The worker publishes RollupBuilder.wire_rows() through encode_wire; what it
    # sends must be byte for byte what encode makes of the same rows in the store's
    # types, odd milliseconds, several minutes and a later event raising last_time
    # included.
    builder = RollupBuilder()
    for i in range(2_000):
        at = T0 + timedelta(seconds=i * 0.7919, microseconds=i * 37)
        builder.add(build.request(f"acct-{i % 97}", "gw", units=0.001 * i, route="/v1/x", time=at))
    builder.add(build.stream_closed("acct-0", "gw", "s-1", units=2.0, time=T0))
    builder.add(build.stream_opened("acct-1", "gw", "s-2", time=T0 + timedelta(microseconds=999)))
    rows = store_rows(builder.wire_rows())
    expected = encode(Delta(3, 4_321, 1_774_000_000_123, rows), max_bytes)
    got = encode_wire(3, 4_321, 1_774_000_000_123, builder.wire_rows(), max_bytes)
    assert len(expected) > (1 if max_bytes < 100_000 else 0)
    assert got == expected


def test_a_heartbeat_has_no_rows() -> None:
    [message] = encode(Delta(2, 7, 99, []))
    assert decode(message).rows == []


def test_unknown_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        decode(orjson.dumps({"v": 99}))
    with pytest.raises(ValueError, match="JSON"):
        decode(b"{nope")


def _v1(delta: Delta) -> bytes:
    """A message as wire version 1 wrote it (one JSON object, rows inside)."""
    return orjson.dumps(
        {
            "v": 1,
            "partition": delta.partition,
            "next_offset": delta.next_offset,
            "reflected_ms": delta.reflected_ms,
            "final": delta.final,
            "rows": [
                [r[0], int(r[1].timestamp()), *r[2:13], int(r[13].timestamp() * 1000)]
                for r in delta.rows
            ],
        }
    )


def test_version_1_messages_are_still_read_the_same() -> None:
    rows = _rows(3)
    delta = Delta(4, 1234, 99, rows)
    [v2] = encode(delta)
    assert decode(_v1(delta)).rows == rows
    assert read(_v1(delta)).wire_rows() == read(v2).wire_rows()
    assert read(_v1(delta)) == read(v2)


def test_read_leaves_the_rows_as_clickhouse_ready_bytes() -> None:
    rows = _rows(2)
    [message] = encode(Delta(4, 1234, 99, rows))
    frame = read(message)
    assert (frame.partition, frame.next_offset, frame.reflected_ms, frame.final) == (
        4,
        1234,
        99,
        True,
    )
    assert frame.count == 3
    cells = orjson.loads(b"[" + frame.body + b"]")
    # rollup_minute's columns in order: epoch seconds, epoch ms, offset_end 0.
    assert cells[0][1] == int(T0.replace(second=0, microsecond=0).timestamp())
    assert cells[0][13] == int(T0.timestamp() * 1000)
    assert [len(c) for c in cells] == [15, 15, 15]
    assert {c[14] for c in cells} == {0}
    assert frame.wire_rows() == [c[:14] for c in cells]
    assert read(encode(Delta(2, 7, 99, []))[0]).body == b""


def test_unknown_version_2_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        decode(orjson.dumps({"v": 99, "count": 0}) + b"\n")
    with pytest.raises(ValueError, match="JSON"):
        decode(b"{nope\n[1]")
