"""Folding valid events into per-account, per-minute rollup deltas (pure).

A delta row is keyed by (account, minute, type, route, method, model, status,
stream_id); absent dimensions are '' or 0 so the key is total. Units are kept in
integer millionths (`units_micro`) so that sums are exact in Python and in
ClickHouse. `last_time` is the latest event time folded into the row. The
columns, the wire layout and the markers are schemas/rollup_table.py's.
"""

from __future__ import annotations

from typing import Any

from processors.decode import Flat, flatten
from schemas.events import AnyEvent, RequestEvent

RollupKey = tuple[str, int, str, str, str, str, int, str]


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
        time = event.time
        key = (event.subject, int(time.timestamp()) // 60 * 60, event.type, event.route,
               event.method, event.model, event.status, event.stream_id)  # fmt: skip
        units = round(event.units * 1_000_000)
        totals = self._totals.get(key)
        if totals is None:
            self._totals[key] = [time, 1, units, 0.0 + event.latency_ms, event.bytes_in,
                                 event.bytes_out]  # fmt: skip
            return
        if time > totals[0]:
            totals[0] = time
        totals[1] += 1
        totals[2] += units
        totals[3] += event.latency_ms
        totals[4] += event.bytes_in
        totals[5] += event.bytes_out

    def __len__(self) -> int:
        return len(self._totals)

    def wire_rows(self) -> list[list[object]]:
        """The folded rows in the layout deltas go on the wire in (schemas/deltas.py):
        `schemas.rollup_table.SPEC` order, the minute in epoch seconds, last_time in
        epoch milliseconds, offset_end 0. No datetime is built per row: this is the
        worker's hot path
        (`deltas.store_rows` gives the store's types where a caller needs them).
        """
        return [
            [*key, t[1], t[2], t[3], t[4], t[5], int(t[0].timestamp() * 1000), 0]
            for key, t in self._totals.items()
        ]
