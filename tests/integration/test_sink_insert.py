"""The sink's INSERT of raw wire rows: the same stored values as typed rows, one part.

The sink hands the deltas' row bytes to ClickHouse (INSERT ... SELECT from the
JSONCompactEachRow rows) instead of building Python rows for clickhouse-connect.
These tests hold it to what clickhouse-connect stores from the same rows decoded into
Python values (`_typed_path`, the oracle), and to the one-part atomicity
the exactly-once design rests on (docs/exactly-once.md), on both stores: the embedded
engine reads the rows from a file, a ClickHouse server as INSERT ... FROM input() with
the INSERT's settings sent as HTTP settings (schemas/store.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition

from processors.sink import Sink
from schemas.deltas import Delta, decode, encode, read
from schemas.rollup_table import COLUMNS, MARKER_ACCOUNT, MARKER_TYPE, TABLE
from schemas.store import Store
from schemas.windows import EPOCH

U64 = 2**64 - 1
LABELS = ["q\"uo'te", "back\\slash\\", "uni ünï 漢字 🚀", "line\nbreak\ttab\u2028", "", "$$"]
TIMES = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 3, 29, 10, 15, 59, 999000, tzinfo=UTC),
    datetime(2026, 3, 29, 10, 16, 0, 1000, tzinfo=UTC),
    datetime(2026, 3, 29, 10, 16, 0, 123456, tzinfo=UTC),  # sub-ms: the wire keeps ms
    datetime(2106, 2, 7, 6, 27, 0, 999999, tzinfo=UTC),
]
FLOATS = [0.0, 0.1 + 0.2, 1e300, 5e-324, 123.456789012345, 2.0**53 + 1.0]


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _deltas() -> list[Delta]:
    rows: list[list[Any]] = []
    for i, label in enumerate(LABELS * 3):
        at = TIMES[i % len(TIMES)]
        rows.append(
            [
                f"acct-{label}",
                _minute(at),
                "tally.request.v1",
                label,
                "GET" if i % 2 else label,
                label[::-1],
                [0, 200, 65535][i % 3],
                label if i % 4 == 0 else "",
                [1, 0, U64][i % 3],
                [U64, 0, 1_500_000][i % 3],
                FLOATS[i % len(FLOATS)],
                [0, U64, 7][i % 3],
                [U64, 0, 9][i % 3],
                at,
                0,
            ]
        )
    # The same keys again in a second delta: summed alike by both paths.
    again = [[*row[:8], 1, 2, 0.5, 3, 4, row[13] + timedelta(milliseconds=1), 0] for row in rows]
    return [
        Delta(0, 100, 1_774_000_000_123, rows),
        Delta(1, 7, 1_774_000_000_999, again[:5]),
        Delta(1, 9, 1, []),  # heartbeat: freshness only
        Delta(0, 120, 4_294_967_295_999, again[5:]),
    ]


class _Record:
    def __init__(self, offset: int, value: bytes) -> None:
        self.offset, self.value = offset, value


def _markers(
    topic: str, next_offsets: dict[int, int], reflected: dict[int, datetime]
) -> list[list[object]]:
    """Offset markers as Python-typed rows: the oracle's side of rollup.offset_markers."""
    return [
        [
            *(MARKER_ACCOUNT, EPOCH, MARKER_TYPE, topic, "", "", partition, ""),
            *(0, 0, 0.0, 0, 0, reflected.get(partition, EPOCH), offset),
        ]
        for partition, offset in sorted(next_offsets.items())
    ]


def _typed_path(store: Store, messages: list[bytes], rollups: str, events: str) -> None:
    """The oracle: the deltas decoded into Python-typed rows, inserted by clickhouse-connect
    (which converts each value itself), with their markers in the same INSERT."""
    rows: list[list[object]] = []
    counted: dict[int, int] = {}
    fresh: dict[int, int] = {}
    for value in messages:
        delta = decode(value)
        rows.extend(delta.rows)
        fresh[delta.partition] = max(fresh.get(delta.partition, 0), delta.reflected_ms)
        counted[delta.partition] = max(counted.get(delta.partition, -1), delta.next_offset)
    markers = _markers(rollups, {0: len(messages)}, {})
    freshness = _markers(
        events,
        {p: counted[p] for p in fresh},
        {p: datetime.fromtimestamp(ms / 1000, UTC) for p, ms in fresh.items()},
    )
    store.insert(TABLE, rows + markers + freshness, COLUMNS)


@pytest.fixture(params=["embedded", "server"])
def target_url(request: pytest.FixtureRequest) -> str:
    """The store written: the embedded engine, then a ClickHouse server (tests/conftest.py)."""
    url: str = request.getfixturevalue(
        "store_url" if request.param == "embedded" else "clickhouse_server_url"
    )
    return url


KEY = "account, minute, type, route, method, model, status, stream_id"


def _stored(store: Store) -> list[tuple[Any, ...]]:
    """The table as every reader sees it: rows of one key summed (merges are eventual).

    The rollups topic's markers carry when the sink wrote them (for /readyz), which
    the oracle's markers do not carry: that time is left out of the comparison.
    """
    rows = store.query(
        f"SELECT {KEY}, sum(events), sum(units_micro), sum(latency_ms_sum), sum(bytes_in), "
        "sum(bytes_out), max(last_time), toUnixTimestamp64Milli(max(last_time)), "
        f"max(offset_end) FROM {TABLE} GROUP BY {KEY} ORDER BY {KEY}"
    )
    return [
        (*row[:13], EPOCH, 0, row[15]) if row[2] == MARKER_TYPE and row[3] == "r" else row
        for row in rows
    ]


def _gated_sink(store: Store) -> Sink:
    """A sink holding rollups partition 0 through a write gate, as after an assignment:
    what these tests check holds for the rows as they reach `rollup_minute` through it."""
    sink = Sink(store, "127.0.0.1:9", "r", "e")
    sink._gate = sink.gates.take([0])
    return sink


def _open(store_url: str, database: str) -> Store:
    store = Store(store_url, database)
    store.migrate()
    return store


async def test_raw_rows_store_exactly_what_typed_rows_store(
    target_url: str, unique_name: str
) -> None:
    messages = [m for delta in _deltas() for m in encode(delta)]
    old = _open(target_url, f"{unique_name}_old")
    new = _open(target_url, f"{unique_name}_new")
    _typed_path(old, messages, "r", "e")

    sink = _gated_sink(new)
    await sink._apply([(TopicPartition("r", 0), [_Record(i, m) for i, m in enumerate(messages)])])

    want = _stored(old)
    assert len(want) > len(LABELS) * 3  # deltas and markers both there
    assert _stored(new) == want
    # What the usage view's feed reads of them: 14 columns, as version 1 carried them.
    assert all(len(row) == 14 for m in messages for row in read(m).wire_rows())


async def test_version_1_messages_are_still_applied(target_url: str, unique_name: str) -> None:
    delta = _deltas()[0]
    v1 = orjson.dumps(
        {
            "v": 1,
            "partition": delta.partition,
            "next_offset": delta.next_offset,
            "reflected_ms": delta.reflected_ms,
            "final": True,
            "rows": read(encode(delta)[0]).wire_rows(),
        }
    )
    old = _open(target_url, f"{unique_name}_old")
    new = _open(target_url, f"{unique_name}_new")
    _typed_path(old, encode(delta), "r", "e")
    sink = _gated_sink(new)
    await sink._apply([(TopicPartition("r", 0), [_Record(0, v1)])])
    assert _stored(new) == _stored(old)


@pytest.mark.parametrize("rows", [200_000])
async def test_one_insert_of_many_rows_is_one_part(
    target_url: str, unique_name: str, rows: int
) -> None:
    store = _open(target_url, unique_name)
    # Merges would hide a split: with them stopped, every block stays a part.
    store.command(f"SYSTEM STOP MERGES {TABLE}")
    minute = datetime(2026, 3, 29, 10, 15, tzinfo=UTC)
    delta = Delta(
        0,
        1,
        0,
        [
            [f"acct-{i:07d}", minute, "t", "/r", "GET", "", 200, "", 1, 1, 0.5, 1, 1, minute, 0]
            for i in range(rows)
        ],
    )
    messages = encode(delta)
    assert len(messages) > 1  # split on the wire, joined again by the sink
    sink = _gated_sink(store)
    await sink._apply([(TopicPartition("r", 0), [_Record(i, m) for i, m in enumerate(messages)])])
    parts = await asyncio.to_thread(
        store.query,
        "SELECT count(), sum(rows) FROM system.parts "
        "WHERE database = {db:String} AND table = {t:String} AND active",
        {"db": unique_name, "t": TABLE},
    )
    assert parts == [(1, rows + 2)]  # the deltas, one offset marker, one freshness marker


async def test_an_insert_leaves_folding_to_merges(target_url: str, unique_name: str) -> None:
    """The sink's INSERT does not fold rows of one key (optimize_on_insert = 0, the
    costlier half of an INSERT): it stores them as they came, merges fold them later.
    Also shows each store honours the INSERT's settings: written into the statement on
    the embedded engine, sent as HTTP settings to a server."""
    store = _open(target_url, unique_name)
    store.command(f"SYSTEM STOP MERGES {TABLE}")
    minute = datetime(2026, 3, 29, 10, 15, tzinfo=UTC)
    row = ["acct-1", minute, "t", "/r", "GET", "", 200, "", 1, 1, 0.5, 1, 1, minute, 0]
    messages = encode(Delta(0, 1, 0, [row])) + encode(Delta(0, 2, 0, [row]))
    sink = _gated_sink(store)
    await sink._apply([(TopicPartition("r", 0), [_Record(i, m) for i, m in enumerate(messages)])])
    stored = await asyncio.to_thread(
        store.query, f"SELECT count(), sum(events) FROM {TABLE} WHERE account = 'acct-1'"
    )
    assert stored == [(2, 2)]
