"""Write gates: the fence that keeps a paused or cut-off sink from applying a delta twice.

ClickHouse has no conditional INSERT, but DDL on a table name is a compare-and-set
(CREATE TABLE fails when the name exists) and dropping a table is a fence (an
INSERT into it fails afterwards, and DROP ... SYNC returns only once every INSERT
already running through it has finished). A sink therefore never writes into
`rollup_minute` directly: it writes into its own *gate*, a Null table
`rollup_gate_<epoch>` whose materialized view `rollup_gate_<epoch>_mv` forwards
each INSERT, as the same single block and so the same single part, into
`rollup_minute`. The gate's comment lists the rollups partitions it may write.

Taking partitions over (`Gates.take`), in this order:

1. create a gate with an epoch one above every existing gate's (a name taken by a
   concurrent sink fails the CREATE: take the next);
2. drop, SYNC, every other gate with a lower epoch that shares a partition;
3. give up the partitions shared with a gate of a *higher* epoch (a sink that
   took them over after this one looked), never writing them;
4. only then read the offset markers and resume after them.

Why that is a fence (docs/exactly-once.md argues it in full): of two gates that
share partition p, the one with the lower epoch either existed when the higher
one's owner listed gates in step 2, and was dropped before that owner read its
markers (so every INSERT through it landed before that read, or fails), or it
was created after that listing, and its owner sees the higher gate in step 3
and never writes p. A gate covering p is only ever dropped in favour of a
higher one that covers p, or by its owner when it stops writing, so step 3
cannot miss it. No clock is involved.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from schemas.rollup_table import TABLE
from schemas.store import Store

log = logging.getLogger("tally.sink")

PREFIX = "rollup_gate_"
_NAME = re.compile(rf"^{PREFIX}(\d+)(_mv)?$")
TARGET = TABLE


@dataclass(frozen=True)
class Gate:
    """One gate: the table a sink INSERTs into for the partitions it holds."""

    epoch: int
    partitions: frozenset[int]
    lost: frozenset[int] = field(default_factory=frozenset)
    """Partitions a gate of a higher epoch holds: never written through this one."""

    @property
    def table(self) -> str:
        return f"{PREFIX}{self.epoch}"

    @property
    def writable(self) -> frozenset[int]:
        return self.partitions - self.lost


@dataclass(frozen=True)
class _Listed:
    epoch: int
    partitions: frozenset[int]


class Gates:
    """The gates of one store (all SQL of the fence is here)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def take(self, partitions: Collection[int]) -> Gate:
        """A gate for `partitions`, with every older writer of them fenced off."""
        wanted = frozenset(partitions)
        gate = self._create(wanted)
        lost: set[int] = set()
        for other in self._list():
            shared = other.partitions & wanted
            if other.epoch == gate.epoch:
                continue
            if other.epoch < gate.epoch and (shared or not other.partitions):
                # An older writer of these partitions, or a view left without its gate.
                self._drop(other.epoch)
            elif other.epoch > gate.epoch:
                lost |= shared
        if lost:
            log.warning(
                "sink: partitions %s of %s are held by a newer sink; not writing them",
                sorted(lost),
                gate.table,
            )
        return Gate(gate.epoch, wanted, frozenset(lost))

    def alive(self, gate: Gate) -> bool:
        """Whether `gate` still exists (False: this sink has been fenced off)."""
        rows = self.store.query(
            "SELECT count() FROM system.tables "
            "WHERE database = currentDatabase() AND name = {name:String}",
            {"name": gate.table},
        )
        return bool(rows and rows[0][0])

    def release(self, gate: Gate) -> None:
        """Drop this sink's own gate; only once it will write through it no more."""
        self._drop(gate.epoch)

    def _create(self, partitions: frozenset[int]) -> Gate:
        comment = ",".join(str(p) for p in sorted(partitions))
        while True:
            epoch = max((g.epoch for g in self._list()), default=0) + 1
            name = f"{PREFIX}{epoch}"
            try:
                self.store.command(
                    f"CREATE TABLE {name} AS {TARGET} ENGINE = Null COMMENT '{comment}'"
                )
            except Exception as exc:
                if "TABLE_ALREADY_EXISTS" in str(exc) or "already exists" in str(exc):
                    continue  # another sink took this epoch first: take the next
                raise
            self.store.command(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}_mv TO {TARGET} "
                f"AS SELECT * FROM {name}"
            )
            return Gate(epoch, partitions)

    def _list(self) -> list[_Listed]:
        rows = self.store.query(
            "SELECT name, comment FROM system.tables "
            "WHERE database = currentDatabase() AND startsWith(name, {prefix:String})",
            {"prefix": PREFIX},
        )
        gates: dict[int, _Listed] = {}
        for name, comment in rows:
            match = _NAME.match(str(name))
            if match is None:
                continue
            epoch = int(match.group(1))
            if match.group(2):
                # A view whose gate is gone (a drop cut short): still in the listing,
                # so that its epoch is never reused and the next drop removes it.
                gates.setdefault(epoch, _Listed(epoch, frozenset()))
                continue
            held = frozenset(int(p) for p in str(comment).split(",") if p.strip())
            gates[epoch] = _Listed(epoch, held)
        return sorted(gates.values(), key=lambda g: g.epoch)

    def _drop(self, epoch: int) -> None:
        # The Null table first: from then on an INSERT into it fails loudly, and
        # SYNC waits for any INSERT already running through it (and its view).
        # Dropping the view first would let an INSERT "succeed" into nothing.
        self.store.command(f"DROP TABLE IF EXISTS {PREFIX}{epoch} SYNC")
        self.store.command(f"DROP TABLE IF EXISTS {PREFIX}{epoch}_mv SYNC")
