"""Write gates on a real store: who may write which rollups partitions (sink_fence.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from processors.sink_fence import Gate, Gates
from schemas.rollup_table import COLUMNS, INSERT_SETTINGS, TABLE, WIRE_SELECT, WIRE_STRUCTURE
from schemas.store import Store

MINUTE = int(datetime(2026, 12, 1, 9, 0, tzinfo=UTC).timestamp())


def _write(store: Store, gate: Gate, events: int) -> None:
    row = ["acct", MINUTE, "t", "/r", "GET", "", 200, "", events, 0, 0.0, 0, 0, 0, 0]
    body = orjson.dumps([row])[1:-1]
    store.insert_json_rows(gate.table, COLUMNS, WIRE_STRUCTURE, WIRE_SELECT, body, INSERT_SETTINGS)


def _events(store: Store) -> int:
    return int(store.query(f"SELECT sum(events) FROM {TABLE} WHERE account = 'acct'")[0][0])


def test_a_gate_writes_through_to_the_rollups(store: Store) -> None:
    gate = Gates(store).take([0, 1])
    _write(store, gate, 3)
    assert _events(store) == 3
    assert gate.writable == {0, 1}


def test_taking_a_partition_over_fences_its_previous_writer(store: Store) -> None:
    gates = Gates(store)
    old = gates.take([0, 1])
    new = gates.take([1, 2])
    assert new.epoch > old.epoch
    assert not gates.alive(old)
    with pytest.raises(Exception, match=r"UNKNOWN_TABLE|does not exist"):
        _write(store, old, 5)
    _write(store, new, 2)
    assert _events(store) == 2


def test_sinks_with_disjoint_partitions_do_not_fence_each_other(store: Store) -> None:
    gates = Gates(store)
    first = gates.take([0, 1])
    second = gates.take([2, 3])
    assert gates.alive(first)
    assert gates.alive(second)
    _write(store, first, 1)
    _write(store, second, 1)
    assert _events(store) == 2


class _StaleGates(Gates):
    """A sink whose look at the gates is stale: it creates the epoch it picked before
    another sink took the partitions (it was paused between listing and creating)."""

    def __init__(self, store: Store, epoch: int) -> None:
        super().__init__(store)
        self.epoch = epoch

    def _create(self, partitions: frozenset[int]) -> Gate:
        name = f"rollup_gate_{self.epoch}"
        comment = ",".join(str(p) for p in sorted(partitions))
        self.store.command(f"CREATE TABLE {name} AS {TABLE} ENGINE = Null COMMENT '{comment}'")
        self.store.command(f"CREATE MATERIALIZED VIEW {name}_mv TO {TABLE} AS SELECT * FROM {name}")
        return Gate(self.epoch, partitions)


def test_a_gate_created_late_with_a_stale_epoch_gives_up_the_shared_partitions(
    store: Store,
) -> None:
    gates = Gates(store)
    for _ in range(3):  # epochs 1..3, each fencing the one before: 1 and 2 are free
        gates.take([5])
    newer = gates.take([0, 1])  # epoch 4: the group's current owner of 0 and 1
    stale = _StaleGates(store, 2).take([1, 2])
    assert gates.alive(newer)  # the stale gate does not fence a newer one...
    assert stale.lost == {1}  # ...and never writes the partition that one holds
    assert stale.writable == {2}


def test_a_view_left_without_its_gate_is_cleared_and_its_epoch_not_reused(store: Store) -> None:
    gates = Gates(store)
    gate = gates.take([0])
    store.command(f"DROP TABLE {gate.table} SYNC")  # a drop cut short: the view remains
    following = gates.take([3])
    assert following.epoch == gate.epoch + 1
    names = {
        row[0]
        for row in store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    }
    assert f"{gate.table}_mv" not in names
