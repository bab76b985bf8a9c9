"""The rollup table `rollup_minute` (migration 0001): its columns, its wire layout,
its INSERT, and the offset markers that share it with the usage deltas.

Everything that names a column of the table, or tells a marker from a delta, takes
it from here: the worker's delta rows and the deltas' wire format
(schemas/deltas.py), the sink's INSERT, the API's usage view and queries, admin
totals and `tally reconcile`. The column spec below is the one list: the column
names, the wire layout ClickHouse parses, and the SELECT that turns wire values
into the table's types are all generated from it.

Offset markers are rows of the reserved account '' and type 'kafka.offset', with
route = topic, status = partition, offset_end = the next offset not yet counted,
and last_time = the time the data reflects (events topic) or was written (rollups
topic). They ride in the same INSERT as the deltas they cover, so one statement
that reads both sees them agree. Every reader sums or takes the max (merges are
eventual), and `read_markers` is the one reader of markers alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import NamedTuple

from schemas.store import Store

TABLE = "rollup_minute"


class Column(NamedTuple):
    """One column of `rollup_minute` and how the deltas' wire format carries it."""

    name: str
    wire_type: str
    """The ClickHouse type of the value on the wire (JSONCompactEachRow)."""
    wire_name: str = ""
    """The name of the wire value when it differs from the column's (its unit does)."""
    load: str = ""
    """SQL turning the wire value into the column's value; '' = the value as it is."""


SPEC: tuple[Column, ...] = (
    Column("account", "String"),
    Column("minute", "UInt32", load="toDateTime(minute, 'UTC')"),
    Column("type", "String"),
    Column("route", "String"),
    Column("method", "String"),
    Column("model", "String"),
    Column("status", "UInt16"),
    Column("stream_id", "String"),
    Column("events", "UInt64"),
    Column("units_micro", "UInt64"),
    Column("latency_ms_sum", "Float64"),
    Column("bytes_in", "UInt64"),
    Column("bytes_out", "UInt64"),
    Column(
        "last_time",
        "Int64",
        wire_name="last_time_ms",
        load="fromUnixTimestamp64Milli(last_time_ms, 'UTC')",
    ),
    Column("offset_end", "Int64"),
)
"""The columns in table order: minute in epoch seconds and last_time in epoch
milliseconds on the wire (integers: compact, and exact to the millisecond)."""

COLUMNS: tuple[str, ...] = tuple(c.name for c in SPEC)
WIRE_STRUCTURE = ", ".join(f"{c.wire_name or c.name} {c.wire_type}" for c in SPEC)
"""The wire rows as ClickHouse's input()/file() structure ("name Type, ...")."""
WIRE_SELECT = ", ".join(c.load or c.name for c in SPEC)
"""The wire rows converted to `COLUMNS`: ClickHouse converts, Python builds no row."""
DELTA_COLUMNS = len(SPEC) - 1
"""Columns of a delta row as the API's usage view applies it: all but offset_end
(only markers carry one)."""
POSITION: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}
"""Each column's index in a table or wire row, for the hot loops that read rows as
lists (the view's apply, the overflow split) rather than as `RollupRow`s."""
SUMMED = tuple(POSITION[name] for name in ("units_micro", "bytes_in", "bytes_out"))
"""The integer sums that may outgrow the store's UInt64 (schemas/deltas.py splits them)."""


class RollupRow(NamedTuple):
    """One row of `rollup_minute` in the store's types (what a SELECT * returns)."""

    account: str
    minute: datetime
    type: str
    route: str
    method: str
    model: str
    status: int
    stream_id: str
    events: int
    units_micro: int
    latency_ms_sum: float
    bytes_in: int
    bytes_out: int
    last_time: datetime
    offset_end: int


assert RollupRow._fields == COLUMNS, "RollupRow must follow SPEC"


def to_micro(units: float) -> int:
    """Units as the table keeps them: integer millionths, so sums are exact."""
    return round(units * 1_000_000)


# -- offset markers ------------------------------------------------------------------

MARKER_ACCOUNT = ""
MARKER_TYPE = "kafka.offset"
MARKER_WHERE = "account = {marker_account:String} AND type = {marker_type:String}"
"""The SQL condition that selects markers; bind `MARKER_PARAMS` with it. Statements
that must read markers in the same snapshot as the deltas (the usage view, admin
totals) embed it; everything else calls `read_markers`."""
MARKER_PARAMS: Mapping[str, str] = {"marker_account": MARKER_ACCOUNT, "marker_type": MARKER_TYPE}


class Marker(NamedTuple):
    """Where one partition of one topic stands in the store."""

    topic: str
    partition: int
    offset_end: int
    """The next offset not yet in the store."""
    last_time: datetime
    """Events topic: the time its data reflects; rollups topic: when the sink wrote."""


def read_markers(store: Store, *topics: str) -> list[Marker]:
    """The markers of `topics`, one per (topic, partition), by topic then partition."""
    rows = store.query(
        f"SELECT route, status, max(offset_end), max(last_time) FROM {TABLE} "
        f"WHERE {MARKER_WHERE} AND has({{topics:Array(String)}}, route) "
        "GROUP BY route, status ORDER BY route, status",
        {**MARKER_PARAMS, "topics": list(topics)},
    )
    return [Marker(str(t), int(p), int(o), at) for t, p, o, at in rows]


def offset_markers(
    topic: str, next_offsets: Mapping[int, int], reflected_ms: Mapping[int, int]
) -> list[list[object]]:
    """Per partition of `topic`: the next offset not yet counted, and the time (epoch ms)
    its data reflects, as marker rows in the wire layout (`SPEC`), which the sink
    writes in the same INSERT as the deltas they cover."""
    return [
        [
            *(MARKER_ACCOUNT, 0, MARKER_TYPE, topic, "", "", partition, ""),
            *(0, 0, 0.0, 0, 0, reflected_ms.get(partition, 0), offset),
        ]
        for partition, offset in sorted(next_offsets.items())
    ]


# -- the INSERT ----------------------------------------------------------------------

# One INSERT must stay one part to be atomic: ClickHouse splits a block larger
# than max_insert_block_size (default 1,048,576 rows). The sink flushes well
# below this; the check turns a silent split into a loud error.
MAX_ROWS_PER_INSERT = 1_000_000
_HUGE = 1 << 40
INSERT_SETTINGS: dict[str, int] = {
    # INSERT ... SELECT reads its input in blocks and writes a part per block it
    # hands on: one reading thread, one inserting thread, and squashing whose
    # row threshold is never reached (and whose byte threshold is off) make the
    # whole input one block, so one part; tests/integration/test_sink_insert.py
    # checks it.
    "max_threads": 1,
    "max_insert_threads": 1,
    "input_format_parallel_parsing": 0,
    "max_insert_block_size": _HUGE,
    "max_block_size": _HUGE,
    "min_insert_block_size_rows": _HUGE,
    "min_insert_block_size_bytes": 0,
    # The default fast float parser may be off by an ulp; the values must be
    # exactly what the worker summed.
    "precise_float_parsing": 1,
    # By default an INSERT into an AggregatingMergeTree first folds the rows of
    # its block that share a key. A worker's delta holds one row per key already,
    # so in the bench that pass folded 0.3 % of an INSERT's rows for more than
    # half of its CPU (benchmarks/NOTES.md). Background merges fold them as they
    # fold separate INSERTs, and every reader sums (0001_rollup_minute.sql).
    "optimize_on_insert": 0,
}


class RollupStore:
    """The rollup table: appending deltas with markers, reading markers back."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def write_json(self, body: bytes, count: int, table: str = TABLE) -> None:
        """Append `count` rows, deltas and their offset markers, encoded as the deltas'
        wire rows (version 2), in one INSERT into `table` (`rollup_minute` itself or a
        sink's write gate onto it): all of them land, or none."""
        if count > MAX_ROWS_PER_INSERT:
            raise ValueError(
                f"{count} rows in one INSERT would be split into several parts and "
                f"lose atomicity (limit {MAX_ROWS_PER_INSERT})"
            )
        if count:
            self.store.insert_json_rows(
                table, COLUMNS, WIRE_STRUCTURE, WIRE_SELECT, body, INSERT_SETTINGS
            )

    def resume_offsets(self, topic: str) -> dict[int, int]:
        """Per partition of `topic`, the offset after the last one in the store."""
        return {m.partition: m.offset_end for m in read_markers(self.store, topic)}
