from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from processors.deltas import Delta, decode, encode
from processors.rollup import RollupBuilder
from producers import events as build

T0 = datetime(2026, 3, 29, 10, 15, 42, 123000, tzinfo=UTC)


def _rows(n: int) -> list[list[object]]:
    builder = RollupBuilder()
    for i in range(n):
        builder.add(build.request(f"acct-{i}", "gw", units=1.5, route="/v1/x", time=T0))
    builder.add(build.stream_closed("acct-0", "gw", "s-1", units=2.0, time=T0))
    return builder.rows()


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


def test_a_heartbeat_has_no_rows() -> None:
    [message] = encode(Delta(2, 7, 99, []))
    assert decode(message).rows == []


def test_unknown_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        decode(orjson.dumps({"v": 99}))
    with pytest.raises(ValueError, match="JSON"):
        decode(b"{nope")
