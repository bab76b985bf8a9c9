"""Folding valid events into per-account, per-minute rollup deltas (pure).

A delta row is keyed by (account, minute, type, route, method, model, status,
stream_id); absent dimensions are '' or 0 so the key is total. Units are kept in
integer millionths (`units_micro`) so that sums are exact in Python and in
ClickHouse. `last_time` is the latest event time folded into the row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from processors.decode import (
    AnyEvent,
    Flat,
    NativeEvent,
    NativeRequestData,
    NativeStreamOpenedData,
    flatten,
)
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED, RequestEvent

COLUMNS = (
    "account",
    "minute",
    "type",
    "route",
    "method",
    "model",
    "status",
    "stream_id",
    "events",
    "units_micro",
    "latency_ms_sum",
    "bytes_in",
    "bytes_out",
    "last_time",
    "offset_end",
)

RollupKey = tuple[str, int, str, str, str, str, int, str]

# Offset markers share the table with the deltas (see migration 0001).
MARKER_ACCOUNT = ""
MARKER_TYPE = "kafka.offset"
EPOCH = datetime.fromtimestamp(0, UTC)


def to_micro(units: float) -> int:
    return round(units * 1_000_000)


def key_of(event: AnyEvent) -> RollupKey:
    minute = int(event.time.timestamp()) // 60 * 60
    if isinstance(event, RequestEvent):
        data = event.data
        return (
            event.subject,
            minute,
            event.type,
            data.route or "",
            data.method or "",
            data.model or "",
            data.status or 0,
            "",
        )
    route = getattr(event.data, "route", None) or ""
    model = getattr(event.data, "model", None) or ""
    return (event.subject, minute, event.type, route, "", model, 0, event.data.stream_id)


class RollupBuilder:
    """Accumulates deltas between two flushes."""

    def __init__(self) -> None:
        # key -> [last_time, events, units_micro, latency_ms_sum, bytes_in, bytes_out];
        # a list, not a dataclass: this is touched once per event on the hot path.
        self._totals: dict[RollupKey, list[Any]] = {}

    def add(self, event: AnyEvent) -> None:
        self.add_flat(flatten(event))

    def add_flat(self, event: Flat) -> None:
        """Fold one valid event given as `processors.decode.Flat` values."""
        time = event[4]
        key = (
            event[3],
            int(time.timestamp()) // 60 * 60,
            event[2],
            event[5],
            event[6],
            event[7],
            event[8],
            event[9],
        )
        totals = self._totals.get(key)
        if totals is None:
            self._totals[key] = [
                time,
                1,
                round(event[10] * 1_000_000),
                0.0 + event[11],
                event[12],
                event[13],
            ]
            return
        if time > totals[0]:
            totals[0] = time
        totals[1] += 1
        totals[2] += round(event[10] * 1_000_000)
        totals[3] += event[11]
        totals[4] += event[12]
        totals[5] += event[13]

    def add_native(
        self,
        events: list[NativeEvent],
        times: list[datetime],
        minutes: list[int],
        first_time: Callable[[str, str], bool] | None,
    ) -> tuple[int, int, int, int]:
        """Fold a message's events from `decode_native` that `first_time` has not seen.

        The same fold as `add_flat`, read straight off the Structs (no Flat tuple per
        event). `first_time` None: all are new (`Deduplicator.admit_many`). Returns
        (requests, streams opened, streams closed, duplicates).
        """
        all_totals = self._totals
        get = all_totals.get
        requests = opened = closed = duplicates = 0
        request_data, opened_data = NativeRequestData, NativeStreamOpenedData
        for event, time, minute in zip(events, times, minutes, strict=True):
            if first_time is not None and not first_time(event.source, event.id):
                duplicates += 1
                continue
            d = event.data
            if isinstance(d, request_data):
                key: RollupKey = (event.subject, minute, REQUEST, d.route or "",
                                  d.method or "", d.model or "", d.status or 0, "")  # fmt: skip
                units = d.units
                latency = d.latency_ms or 0.0
                bytes_in = d.bytes_in or 0
                bytes_out = d.bytes_out or 0
                requests += 1
            elif isinstance(d, opened_data):
                key = (event.subject, minute, STREAM_OPENED, d.route or "", "", d.model or "",
                       0, d.stream_id)  # fmt: skip
                units = latency = 0.0
                bytes_in = bytes_out = 0
                opened += 1
            else:
                key = (event.subject, minute, STREAM_CLOSED, "", "", "", 0, d.stream_id)
                units = d.units
                latency = 0.0
                bytes_in = bytes_out = 0
                closed += 1
            totals = get(key)
            if totals is None:
                all_totals[key] = [time, 1, round(units * 1_000_000), latency, bytes_in, bytes_out]
                continue
            if time > totals[0]:
                totals[0] = time
            totals[1] += 1
            totals[2] += round(units * 1_000_000)
            totals[3] += latency
            totals[4] += bytes_in
            totals[5] += bytes_out
        return requests, opened, closed, duplicates

    def __len__(self) -> int:
        return len(self._totals)

    def rows(self) -> list[list[object]]:
        minutes: dict[int, datetime] = {}
        rows: list[list[object]] = []
        for (
            account,
            minute,
            kind,
            route,
            method,
            model,
            status,
            stream_id,
        ), t in self._totals.items():
            at = minutes.get(minute)
            if at is None:
                at = minutes[minute] = datetime.fromtimestamp(minute, UTC)
            rows.append(
                [
                    account,
                    at,
                    kind,
                    route,
                    method,
                    model,
                    status,
                    stream_id,
                    t[1],
                    t[2],
                    t[3],
                    t[4],
                    t[5],
                    t[0],
                    0,
                ]
            )
        return rows

    def wire_rows(self) -> list[list[object]]:
        """rows() in the layout deltas go on the wire in (processors/deltas.py).

        Minute in epoch seconds, last_time in epoch milliseconds and offset_end 0,
        exactly what `deltas.encode` makes of rows(), without building the
        datetimes only to take them apart again: the worker's hot path.
        """
        return [
            [
                account,
                minute,
                kind,
                route,
                method,
                model,
                status,
                stream_id,
                t[1],
                t[2],
                t[3],
                t[4],
                t[5],
                int(t[0].timestamp() * 1000),
                0,
            ]
            for (
                account,
                minute,
                kind,
                route,
                method,
                model,
                status,
                stream_id,
            ), t in self._totals.items()
        ]


def marker_rows(
    topic: str, next_offsets: dict[int, int], reflected_until: dict[int, datetime]
) -> list[list[object]]:
    """Per partition: the next offset not yet counted, and the time its data reflects."""
    return [
        [
            MARKER_ACCOUNT,
            EPOCH,
            MARKER_TYPE,
            topic,
            "",
            "",
            partition,
            "",
            0,
            0,
            0.0,
            0,
            0,
            reflected_until.get(partition, EPOCH),
            offset,
        ]
        for partition, offset in sorted(next_offsets.items())
    ]
