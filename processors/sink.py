"""Writing rollup deltas and their offset markers to ClickHouse, and reading them back."""

from __future__ import annotations

from processors.rollup import COLUMNS, MARKER_ACCOUNT, MARKER_TYPE
from schemas.store import Store

TABLE = "rollup_minute"

# One INSERT must stay one part to be atomic: ClickHouse splits a block larger
# than max_insert_block_size (default 1,048,576 rows). The worker flushes well
# below this; the check turns a silent split into a loud error.
MAX_ROWS_PER_INSERT = 1_000_000


class RollupSink:
    def __init__(self, store: Store) -> None:
        self.store = store

    def write(self, rows: list[list[object]]) -> None:
        """Append deltas and markers in one INSERT: all of them land, or none."""
        if len(rows) > MAX_ROWS_PER_INSERT:
            raise ValueError(
                f"{len(rows)} rows in one flush would be split into several parts and lose "
                f"atomicity; lower TALLY_WORKER_BATCH_MESSAGES (limit {MAX_ROWS_PER_INSERT})"
            )
        if rows:
            self.store.insert(TABLE, rows, COLUMNS)

    def resume_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the next offset of `topic` whose events are not yet counted."""
        rows = self.store.query(
            f"SELECT status, max(offset_end) FROM {TABLE} "
            "WHERE account = {account:String} AND type = {kind:String} AND route = {topic:String} "
            "GROUP BY status",
            {"account": MARKER_ACCOUNT, "kind": MARKER_TYPE, "topic": topic},
        )
        return {int(partition): int(offset) for partition, offset in rows}
