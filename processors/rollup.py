"""Folding valid events into per-account, per-minute rollup deltas (pure).

A delta row is keyed by (account, minute, type, route, method, model, status,
stream_id); absent dimensions are '' or 0 so the key is total. Units are kept in
integer millionths (`units_micro`) so that sums are exact in Python and in
ClickHouse. `last_time` is the latest event time folded into the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from processors.decode import AnyEvent
from schemas.events import RequestEvent, StreamClosedEvent

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


@dataclass(slots=True)
class Totals:
    last_time: datetime
    events: int = 0
    units_micro: int = 0
    latency_ms_sum: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


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
        self._totals: dict[RollupKey, Totals] = {}

    def add(self, event: AnyEvent) -> None:
        key = key_of(event)
        totals = self._totals.get(key)
        if totals is None:
            totals = self._totals[key] = Totals(last_time=event.time)
        elif event.time > totals.last_time:
            totals.last_time = event.time
        totals.events += 1
        if isinstance(event, RequestEvent):
            data = event.data
            totals.units_micro += to_micro(data.units)
            totals.latency_ms_sum += data.latency_ms or 0.0
            totals.bytes_in += data.bytes_in or 0
            totals.bytes_out += data.bytes_out or 0
        elif isinstance(event, StreamClosedEvent):
            totals.units_micro += to_micro(event.data.units)

    def __len__(self) -> int:
        return len(self._totals)

    def rows(self) -> list[list[object]]:
        return [
            [
                account,
                datetime.fromtimestamp(minute, UTC),
                kind,
                route,
                method,
                model,
                status,
                stream_id,
                t.events,
                t.units_micro,
                t.latency_ms_sum,
                t.bytes_in,
                t.bytes_out,
                t.last_time,
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
