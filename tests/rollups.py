"""Writing rollup rows in tests as the sink writes them: wire rows, one INSERT."""

from __future__ import annotations

from datetime import datetime

import orjson

from schemas.rollup_table import RollupStore
from schemas.store import Store


def write_wire(store: Store, rows: list[list[object]]) -> None:
    """Rows in the wire layout (`RollupBuilder.wire_rows`, `rollup.offset_markers`: the
    minute in epoch seconds, `last_time` in epoch ms, offset_end last) through the
    sink's own INSERT, `RollupStore.write_json`."""
    RollupStore(store).write_json(orjson.dumps(rows)[1:-1], len(rows))


def ms(at: datetime) -> int:
    """A time as the wire's epoch milliseconds."""
    return int(at.timestamp() * 1000)
