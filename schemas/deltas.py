"""Rollup deltas on the wire: what workers send to the rollups topic (pure).

A worker folds a batch of one events partition into delta rows and publishes them
as one or more messages (each under the Kafka record limit) in one transaction,
together with the consumed offset. The sink applies every committed message once.

Version 2 (what `encode` writes): one JSON header line, b"\n", then the rows:
{"v": 2, "partition": p, "next_offset": n, "reflected_ms": t, "final": f,
"count": k}\n[row],[row],... Each row holds the columns of `rollup_minute` in
the order and wire types of `schemas.rollup_table.SPEC`: [account, minute_s, type,
route, method, model, status, stream_id, events, units_micro, latency_ms_sum,
bytes_in, bytes_out, last_time_ms, offset_end] (offset_end 0: only markers carry
one). Comma-separated rows are what ClickHouse's JSONCompactEachRow reads, so the
sink joins the row parts of many messages with "," and hands them to one INSERT
without parsing a row.

Version 1 (still read, for deltas written before an upgrade): one JSON object
{"v": 1, "partition": p, "next_offset": n, "reflected_ms": t, "final": f,
"rows": [[the first 14 columns above], ...]}.

`reflected_ms` is the time up to which partition p's events are counted once
this message is applied; a message without rows is a heartbeat that only says
that. A delta split into several messages marks its last one final: only then
are all of the batch's rows out, so only then may the sink say partition p is
counted up to `next_offset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.rollup_table import DELTA_COLUMNS, POSITION, SUMMED, RollupRow

VERSION = 2
# Kafka's default record limit is ~1 MiB; stay well below it with headroom
# for the envelope and the batch framing.
MAX_MESSAGE_BYTES = 700_000


@dataclass(frozen=True, slots=True)
class Delta:
    partition: int
    next_offset: int
    reflected_ms: int
    rows: Sequence[RollupRow]
    """The delta's rows in the store's types (`store_rows`)."""
    final: bool = True


@dataclass(frozen=True, slots=True)
class Frame:
    """A delta message as the sink applies it: the header parsed, the rows not."""

    partition: int
    next_offset: int
    reflected_ms: int
    final: bool
    count: int
    body: bytes
    """The rows as comma-separated JSONCompactEachRow in `rollup_minute`'s column
    order (version 2's row part; a version 1 message is re-encoded into it)."""

    def wire_rows(self) -> list[list[Any]]:
        """The rows as the API's usage view applies them (query_api/view_feed.py)."""
        return rows_of(self.body)


def rows_of(body: bytes) -> list[list[Any]]:
    """Rows of a version 2 row part, without offset_end."""
    if not body:
        return []
    return [row[:DELTA_COLUMNS] for row in orjson.loads(b"[" + body + b"]")]


def _wire_rows(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    # Datetimes become integers: compact, and exact to the millisecond. A delta
    # holds few distinct minutes (and the builder shares their datetimes), so
    # each minute converts once.
    minutes: dict[Any, int] = {}
    out: list[list[Any]] = []
    append = out.append
    for row in rows:
        minute = row[1]
        at = minutes.get(minute)
        if at is None:
            at = minutes[minute] = int(minute.timestamp())
        append([row[0], at, *row[2:13], int(row[13].timestamp() * 1000), 0])
    return out


def _bodies(rows: list[list[Any]], budget: int) -> list[tuple[bytes, int]]:
    """Row parts of at most `budget` bytes each (a lone larger row goes alone)."""
    # One dumps of a whole list is far cheaper than one per row. A delta too big
    # for one message (rare) is cut by the size of a sample of its rows first,
    # so that most of it is encoded once; a part still too big is halved.
    if len(rows) > _SAMPLE:
        per_row = len(orjson.dumps(rows[:_SAMPLE])) / _SAMPLE
        if per_row * len(rows) > budget:
            step = max(1, int(budget * 0.8 / per_row))
            out: list[tuple[bytes, int]] = []
            for i in range(0, len(rows), step):
                out.extend(_bodies(rows[i : i + step], budget))
            return out
    body = orjson.dumps(rows)[1:-1]
    if len(body) <= budget or len(rows) <= 1:
        return [(body, len(rows))]
    half = len(rows) // 2
    return _bodies(rows[:half], budget) + _bodies(rows[half:], budget)


_SAMPLE = 256


def encode(delta: Delta, max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """One delta as messages of at most `max_bytes` each (at least one message)."""
    return encode_wire(
        delta.partition, delta.next_offset, delta.reflected_ms, _wire_rows(delta.rows), max_bytes
    )


# Room for a message's header line within MAX_MESSAGE_BYTES.
_HEADER_ROOM = 200
BODY_BUDGET = MAX_MESSAGE_BYTES - _HEADER_ROOM
"""The largest row part of a delta message (a lone larger row goes alone)."""


def wire_bodies(rows: list[list[Any]], budget: int = BODY_BUDGET) -> list[tuple[bytes, int]]:
    """Rows in the wire layout (RollupBuilder.wire_rows) as row parts of at most
    `budget` bytes, with their row counts: one empty part when there are none."""
    try:
        return _bodies(rows, budget)
    except orjson.JSONEncodeError:  # a sum above 64 bits: only then look for it
        return _bodies(split_overflowing(rows), budget)


_U64_MAX = 2**64 - 1
_EVENTS, _LATENCY = POSITION["events"], POSITION["latency_ms_sum"]


def split_overflowing(rows: list[list[Any]]) -> list[list[Any]]:
    """Rows whose sums fit the store's UInt64 columns, adding up to the same totals.

    Events carry at most MAX_UNITS and MAX_COUNT (schemas/events.py), but a row sums
    many. A larger sum goes out as rows of no events carrying 2^64 - 1 each, then the
    row with the rest: the store adds them up again. (The native fold does the same.)
    """
    out: list[list[Any]] = []
    for row in rows:
        while any(row[i] > _U64_MAX for i in SUMMED):
            part = list(row)
            part[_EVENTS], part[_LATENCY] = 0, 0.0
            rest = list(row)
            for i in SUMMED:
                part[i] = min(row[i], _U64_MAX)
                rest[i] = row[i] - part[i]
            out.append(part)
            row = rest
        out.append(row)
    return out


def encode_wire(
    partition: int,
    next_offset: int,
    reflected_ms: int,
    rows: list[list[Any]],
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """`encode` of rows already in the wire layout (RollupBuilder.wire_rows)."""
    return encode_bodies(
        partition, next_offset, reflected_ms, wire_bodies(rows, max_bytes - _HEADER_ROOM)
    )


def encode_bodies(
    partition: int, next_offset: int, reflected_ms: int, bodies: list[tuple[bytes, int]]
) -> list[bytes]:
    """One delta as messages, from its row parts (`wire_bodies`, or the native fold's)."""
    last = len(bodies) - 1
    return [
        orjson.dumps(
            {
                "v": VERSION,
                "partition": partition,
                "next_offset": next_offset,
                "reflected_ms": reflected_ms,
                "final": i == last,
                "count": count,
            }
        )
        + b"\n"
        + body
        for i, (body, count) in enumerate(bodies)
    ]


def _loads(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"delta message is not JSON: {exc}") from None


def _refuse(doc: Any) -> ValueError:
    return ValueError(
        f"unsupported delta message version {doc.get('v') if isinstance(doc, dict) else doc!r}"
    )


def read(value: bytes) -> Frame:
    """The header of a delta message and its rows as bytes; raises ValueError on anything else."""
    # orjson never writes a raw newline, so only version 2 has one: after its header.
    newline = value.find(b"\n")
    if newline < 0:
        doc = _loads(value)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise _refuse(doc)
        rows = doc["rows"]
        body = orjson.dumps([[*row, 0] for row in rows])[1:-1]
        count = len(rows)
    else:
        doc = _loads(value[:newline])
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise _refuse(doc)
        body = value[newline + 1 :]
        count = int(doc["count"])
    return Frame(
        int(doc["partition"]),
        int(doc["next_offset"]),
        int(doc["reflected_ms"]),
        bool(doc.get("final", True)),
        count,
        body,
    )


def decode(value: bytes) -> Delta:
    """Parse a delta message, rows included; raises ValueError on anything else."""
    frame = read(value)
    rows = store_rows(frame.wire_rows())
    return Delta(frame.partition, frame.next_offset, frame.reflected_ms, rows, frame.final)


def store_rows(wire: list[list[Any]]) -> list[RollupRow]:
    """Wire rows (`RollupBuilder.wire_rows`, with or without offset_end) in the store's
    column types: the minute and last_time as UTC datetimes, offset_end 0 (deltas
    carry none, markers do). The inverse of what `encode` does to `Delta.rows`."""
    # One datetime per distinct minute (a delta holds few), and no per-row helper call.
    minutes: dict[Any, datetime] = {}
    rows: list[RollupRow] = []
    append = rows.append
    fromtimestamp = datetime.fromtimestamp
    for cells in wire:
        account, minute, kind, route, method, model, status, stream_id = cells[:8]
        events, units_micro, latency_ms_sum, bytes_in, bytes_out, last_ms = cells[8:14]
        at = minutes.get(minute)
        if at is None:
            at = minutes[minute] = fromtimestamp(minute, UTC)
        append(
            RollupRow(account, at, kind, route, method, model, status, stream_id, events,
                      units_micro, latency_ms_sum, bytes_in, bytes_out,
                      fromtimestamp(last_ms / 1000, UTC), 0)
        )  # fmt: skip
    return rows
