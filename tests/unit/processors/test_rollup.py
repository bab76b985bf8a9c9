from __future__ import annotations

from datetime import UTC, datetime

from processors.rollup import RollupBuilder
from producers import events as build
from schemas.deltas import store_rows
from schemas.rollup_table import COLUMNS, MARKER_ACCOUNT, MARKER_TYPE, offset_markers

T0 = datetime(2026, 3, 29, 10, 15, 42, 123000, tzinfo=UTC)


def _rows(builder: RollupBuilder) -> list[dict[str, object]]:
    return [dict(zip(COLUMNS, row, strict=True)) for row in store_rows(builder.wire_rows())]


def test_streams_are_keyed_by_stream_id_and_keep_their_latest_time() -> None:
    builder = RollupBuilder()
    builder.add(build.stream_opened("a", "gw", "s-1", route="/v1/chat", time=T0))
    builder.add(build.stream_opened("a", "gw", "s-1", route="/v1/chat", time=T0.replace(second=50)))
    builder.add(build.stream_opened("a", "gw", "s-2", route="/v1/chat", time=T0))
    builder.add(build.stream_closed("a", "gw", "s-1", units=2.5, time=T0))
    rows = {(r["type"], r["stream_id"]): r for r in _rows(builder)}
    opened = rows[("tally.stream.opened.v1", "s-1")]
    assert opened["events"] == 2
    assert opened["last_time"] == T0.replace(second=50)
    assert opened["minute"] == datetime(2026, 3, 29, 10, 15, tzinfo=UTC)
    assert rows[("tally.stream.closed.v1", "s-1")]["units_micro"] == 2_500_000
    assert len(rows) == 3


def test_request_units_are_exact_millionths() -> None:
    builder = RollupBuilder()
    for _ in range(10):
        builder.add(build.request("a", "gw", units=0.1, time=T0))
    [row] = _rows(builder)
    assert row["units_micro"] == 1_000_000
    assert row["stream_id"] == ""


def test_markers_carry_offset_and_freshness_per_partition() -> None:
    t0_ms = int(T0.timestamp() * 1000)
    rows = offset_markers("events", {3: 100, 1: 7}, {3: t0_ms})
    named = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
    assert [(r["status"], r["offset_end"]) for r in named] == [(1, 7), (3, 100)]
    assert all(r["account"] == MARKER_ACCOUNT and r["type"] == MARKER_TYPE for r in named)
    assert all(r["route"] == "events" and r["minute"] == 0 for r in named)
    assert named[1]["last_time"] == t0_ms
    assert named[0]["last_time"] == 0
