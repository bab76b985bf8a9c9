"""The rollup table's column spec: the one list the migration, the wire and the INSERT follow."""

from __future__ import annotations

import re

from schemas import rollup_table
from schemas.store import MIGRATIONS_DIR


def _migrated_columns() -> list[str]:
    text = (MIGRATIONS_DIR / "0001_rollup_minute.sql").read_text(encoding="utf-8")
    body = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    create = re.search(r"CREATE TABLE IF NOT EXISTS rollup_minute\s*\((.*?)\)\s*ENGINE", body, re.S)
    assert create is not None
    return [line.split()[0] for line in create.group(1).splitlines() if line.strip()]


def test_the_spec_names_the_migrated_columns_in_order() -> None:
    assert list(rollup_table.COLUMNS) == _migrated_columns()
    assert rollup_table.RollupRow._fields == rollup_table.COLUMNS


def test_the_wire_structure_and_select_follow_the_spec() -> None:
    assert rollup_table.WIRE_STRUCTURE == (
        "account String, minute UInt32, type String, route String, method String, "
        "model String, status UInt16, stream_id String, events UInt64, units_micro UInt64, "
        "latency_ms_sum Float64, bytes_in UInt64, bytes_out UInt64, last_time_ms Int64, "
        "offset_end Int64"
    )
    assert rollup_table.WIRE_SELECT == (
        "account, toDateTime(minute, 'UTC'), type, route, method, model, status, stream_id, "
        "events, units_micro, latency_ms_sum, bytes_in, bytes_out, "
        "fromUnixTimestamp64Milli(last_time_ms, 'UTC'), offset_end"
    )
    assert rollup_table.DELTA_COLUMNS == 14
    assert [rollup_table.COLUMNS[i] for i in rollup_table.SUMMED] == [
        "units_micro",
        "bytes_in",
        "bytes_out",
    ]


def test_offset_markers_are_wire_rows_of_the_reserved_account() -> None:
    rows = rollup_table.offset_markers("tally.events", {3: 40, 1: 7}, {1: 1_000})
    assert rows == [
        ["", 0, "kafka.offset", "tally.events", "", "", 1, "", 0, 0, 0.0, 0, 0, 1_000, 7],
        ["", 0, "kafka.offset", "tally.events", "", "", 3, "", 0, 0, 0.0, 0, 0, 0, 40],
    ]
    assert all(len(row) == len(rollup_table.SPEC) for row in rows)
