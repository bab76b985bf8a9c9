"""The sink: the writer of rollups into ClickHouse.

Workers publish rollup deltas to the rollups topic in Kafka transactions; the
sink reads only committed messages (read_committed) and appends them to
`rollup_minute`. Each INSERT carries the deltas of a run of messages *and*, per
rollups partition, the offset after the last of them (an offset marker). One
INSERT into one unpartitioned MergeTree table is one atomic part, so after any
crash the markers say exactly which messages are in the store, and the sink
resumes right after them: every committed delta is applied once.

Sinks form a Kafka consumer group and split the rollups partitions between them
(processors/sink_group.py). Every INSERT goes through the sink's write gate
(processors/sink_fence.py): a sink taking partitions over first fences off the
gates of their previous writers, then reads the markers, so a sink that was
paused or cut off can never apply a delta its successor applies too. The
embedded store admits one process, so there it is one sink; with a ClickHouse
server, any number of `tally sink` processes may write one database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from processors.exceptions import SinkFencedError
from processors.sink_fence import Gate, Gates
from processors.sink_group import SinkRebalance
from processors.timing import Timings
from schemas.deltas import Frame, read
from schemas.exceptions import OperatorError
from schemas.failure import EXIT_UNSAFE, retry_delay
from schemas.rollup_table import RollupStore, offset_markers
from schemas.store import Store

log = logging.getLogger("tally.sink")

T = TypeVar("T")

Listener = Callable[[Sequence[Sequence[Any]], Mapping[int, int]], None]
"""Called after each INSERT that succeeded with the delta rows it stored, in the
deltas' wire layout ([account, minute_s, type, ...]; schemas/deltas.py), and per
events partition the time (epoch ms) the store now reflects it up to. The alert
evaluator beside a `tally sink` learns from it which accounts to look at again."""

SINK_ROWS_PER_INSERT = 200_000
"""Rows per INSERT the sink flushes at, well below MAX_ROWS_PER_INSERT."""

# An idle sink re-states its rollups markers this often: their write time tells
# /readyz that the sink runs even while workers send it nothing.
SINK_IDLE_MARK_S = 5.0


@dataclass
class SinkStats:
    messages: int = 0
    rows: int = 0
    inserts: int = 0
    duplicate_deltas: int = 0
    """Deltas skipped because the store already counted their events (must stay 0)."""
    write_seconds: Timings = field(default_factory=Timings)
    """Time to apply one batch to the store, retries included (for metrics)."""
    reflected_ms: dict[int, int] = field(default_factory=dict)
    """Per events partition, the time up to which the store reflects it."""
    counted: dict[int, int] = field(default_factory=dict)
    """Per events partition, the offset up to which this sink stored its events
    (what the freshness markers it wrote say, known without reading them back)."""
    last_write_unix: float = 0.0
    fenced: int = 0
    """Batches dropped because a newer sink took this one's partitions over (its
    successor applies them); this sink then writes nothing until its next assignment."""
    partitions: tuple[int, ...] = ()
    """The rollups partitions this sink writes now."""


class Sink:
    def __init__(
        self,
        store: Store,
        bootstrap: str,
        rollups_topic: str,
        events_topic: str,
        group: str | None = None,
        session_timeout_ms: int = 10_000,
    ) -> None:
        """`group` None: this sink takes every partition, with no group (the embedded
        store admits one process, so one sink, which then resumes at once after a
        crash instead of waiting out its predecessor's session); it writes through
        a gate all the same."""
        self.rollups = RollupStore(store)
        self.gates = Gates(store)
        self.rollups_topic = rollups_topic
        self.events_topic = events_topic
        self.group = group
        self.session_timeout_ms = session_timeout_ms
        self.stats = SinkStats()
        self._bootstrap = bootstrap
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        # The gate this sink writes through; None while it holds no partitions.
        self._gate: Gate | None = None
        # Held while a batch is applied, so that a rebalance waits for the INSERT
        # in flight rather than handing partitions over under it.
        self._applying = asyncio.Lock()
        # Per rollups partition held, the next offset to apply. A batch fetched
        # while an assignment was being taken over (from the group's reset point,
        # before the seek to the store's marker) holds records below it: already
        # in the store, never applied again.
        self._next: dict[int, int] = {}
        # Per events partition, the offset up to which its events are in the store.
        self._counted: dict[int, int] = {}
        # Per rollups partition, the offset after the last message in the store.
        self._positions: dict[int, int] = {}
        self._last_mark = time.monotonic()
        self._listeners: list[Listener] = []
        # Wire rows of the deltas in the INSERT being built (kept only for listeners).
        self._wire: list[Sequence[Any]] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        """Apply committed deltas until stop(); anything unexpected ends the process."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("the sink failed; stopping so that nothing is applied twice or skipped")
            os._exit(EXIT_UNSAFE)

    async def _run(self) -> None:
        # Created here, inside the running loop (aiokafka binds to it). Offsets are
        # never committed to Kafka: the store's markers say where to resume.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self.group,  # None: no group, partitions assigned below
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.session_timeout_ms // 4),
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = await self._partitions(consumer)
            if self.group is None:
                tps = [TopicPartition(self.rollups_topic, p) for p in partitions]
                consumer.assign(tps)
                await self.assign(tps)
            else:
                consumer.subscribe([self.rollups_topic], listener=SinkRebalance(self))
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
                if batches:
                    async with self._applying:
                        await self._apply_owned(batches.items())
                elif time.monotonic() - self._last_mark >= SINK_IDLE_MARK_S:
                    await self._mark_alive()
        finally:
            await consumer.stop()
            await self._release()

    async def revoke(self) -> None:
        """The group takes this sink's partitions: stop writing them (after the
        INSERT in flight, if any) and drop the gate."""
        async with self._applying:
            await self._release()

    async def assign(self, assigned: Iterable[TopicPartition]) -> None:
        """The group gives this sink `assigned`: fence off their previous writers,
        then resume each right after the store's marker (or at the beginning)."""
        mine = sorted(tp.partition for tp in assigned if tp.topic == self.rollups_topic)
        async with self._applying:
            await self._release()
            if not mine:
                log.info("sink holds no %s partitions", self.rollups_topic)
                return
            gate = await self._retry("take over partitions", self.gates.take, mine)
            stored = await self._retry(
                "read offset markers", self.rollups.resume_offsets, self.rollups_topic
            )
            consumer = self._consumer
            assert consumer is not None
            tps = [TopicPartition(self.rollups_topic, p) for p in mine]
            if not set(tps) <= consumer.assignment():
                # Another rebalance began while the gate was taken; it calls
                # assign again. Without a gate nothing fetched meanwhile is written.
                await asyncio.to_thread(self.gates.release, gate)
                return
            try:
                for tp in tps:
                    if tp.partition in stored:
                        consumer.seek(tp, stored[tp.partition])
                    else:
                        await consumer.seek_to_beginning(tp)
            except IllegalStateError:  # the same, noticed while seeking
                await asyncio.to_thread(self.gates.release, gate)
                return
            self._counted = await self._retry(
                "read offset markers", self.rollups.resume_offsets, self.events_topic
            )
            self._wire = []
            self._next = {p: stored.get(p, 0) for p in mine}
            self._positions = {p: stored[p] for p in mine if p in stored}
            self._gate = gate
            self.stats.partitions = tuple(sorted(gate.writable))
            log.info(
                "sink writes %s partitions %s through %s from %s",
                self.rollups_topic,
                list(self.stats.partitions),
                gate.table,
                {p: stored.get(p, "the beginning") for p in self.stats.partitions},
            )

    async def _release(self) -> None:
        gate, self._gate = self._gate, None
        self.stats.partitions = ()
        self._positions = {}
        self._wire = []
        if gate is not None:
            try:
                await asyncio.to_thread(self.gates.release, gate)
            except Exception as exc:
                # Left behind, it is harmless: the next sink taking any of its
                # partitions drops it.
                log.warning("sink could not drop its gate %s (%s)", gate.table, exc)

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[int]:
        for _ in range(60):
            found = consumer.partitions_for_topic(self.rollups_topic)
            if found:
                return sorted(found)
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.5)
        raise OperatorError(
            f"topic {self.rollups_topic} does not exist;",
            "start a worker (it creates it) or create it with as many partitions as the "
            "events topic",
        )

    async def _apply_owned(self, batches: Iterable[tuple[TopicPartition, list[object]]]) -> None:
        """Apply the records of the partitions this sink's gate may write; a fenced
        sink drops its batch (its successor resumes from the store's markers)."""
        gate = self._gate
        if gate is None:
            return
        owned: list[tuple[TopicPartition, list[object]]] = []
        for tp, records in batches:
            if tp.partition not in gate.writable:
                continue
            start = self._next.get(tp.partition, 0)
            fresh = [r for r in records if r.offset >= start]  # type: ignore[attr-defined]
            if fresh:
                owned.append((tp, fresh))
                self._next[tp.partition] = fresh[-1].offset + 1  # type: ignore[attr-defined]
        try:
            await self._apply(owned)
        except SinkFencedError:
            self._fenced(gate)

    def _fenced(self, gate: Gate) -> None:
        """Another sink dropped `gate`: write nothing more until an assignment."""
        self.stats.fenced += 1
        self._gate = None
        self.stats.partitions = ()
        self._positions = {}
        self._wire = []
        log.error(
            "sink: %s was dropped by a sink that took partitions %s over (this one "
            "was paused or cut off); its batch is left to that sink; this one writes again "
            "once the group %s assigns it partitions",
            gate.table,
            sorted(gate.writable),
            self.group,
        )

    async def _apply(self, batches: Iterable[tuple[TopicPartition, list[object]]]) -> None:
        # The deltas' rows stay bytes (see deltas.py): parts joined into one INSERT.
        rows: list[bytes] = []
        count = 0
        applied: dict[int, int] = {}
        # Per events partition with a complete delta here: the time it reflects.
        fresh: dict[int, int] = {}
        for tp, records in batches:
            for record in records:
                delta = read(record.value)  # type: ignore[attr-defined]
                if delta.count and delta.next_offset <= self._counted.get(delta.partition, -1):
                    self._skip(delta)
                elif delta.count:
                    rows.append(delta.body)
                    count += delta.count
                    if self._listeners:
                        self._wire.extend(delta.wire_rows())
                applied[tp.partition] = record.offset + 1  # type: ignore[attr-defined]
                if delta.final:  # earlier chunks of a split delta: not all rows are out yet
                    fresh[delta.partition] = max(fresh.get(delta.partition, 0), delta.reflected_ms)
                    counted = self._counted.get(delta.partition, -1)
                    self._counted[delta.partition] = max(counted, delta.next_offset)
                self.stats.messages += 1
                if count >= SINK_ROWS_PER_INSERT:
                    await self._write(rows, count, applied, fresh)
                    rows, count, applied, fresh = [], 0, {}, {}
        if applied:
            await self._write(rows, count, applied, fresh)

    def _skip(self, delta: Frame) -> None:
        """A delta for events the store already counted: a second commit of a batch.

        Workers never commit a batch twice by design (see docs/exactly-once.md);
        this guard keeps a lapse of that design from becoming an overcharge.
        Offsets only grow per events partition, so a delta ending at or below
        the counted offset holds nothing new.
        """
        self.stats.duplicate_deltas += 1
        log.error(
            "sink: skipped a delta for events partition %d ending at offset %d, which the "
            "store already counts (a batch committed twice upstream)",
            delta.partition,
            delta.next_offset,
        )

    async def _write(
        self, rows: list[bytes], count: int, applied: dict[int, int], fresh: dict[int, int]
    ) -> None:
        # The rollups partitions' markers carry when the sink wrote them: /readyz
        # tells a sink that stopped writing from workers that stopped reporting.
        written_ms = int(time.time() * 1000)
        markers = offset_markers(self.rollups_topic, applied, dict.fromkeys(applied, written_ms))
        # Freshness per events partition, for meta.updated_at (see queries.py).
        counted = {p: self._counted[p] for p in fresh}
        markers += offset_markers(self.events_topic, counted, fresh)
        body = b",".join([*rows, orjson.dumps(markers)[1:-1]])
        started = time.perf_counter()
        await self._write_once(body, count + len(markers), applied)
        self.stats.write_seconds.observe(time.perf_counter() - started)
        self.stats.last_write_unix = time.time()
        self._positions.update(applied)
        self._last_mark = time.monotonic()
        for partition, reflected in fresh.items():
            seen = self.stats.reflected_ms.get(partition, 0)
            self.stats.reflected_ms[partition] = max(seen, reflected)
        self.stats.counted.update(counted)
        self.stats.rows += count
        self.stats.inserts += 1
        wire, self._wire = self._wire, []
        for listener in self._listeners:
            listener(wire, fresh)

    async def _mark_alive(self) -> None:
        """Re-state the markers of the partitions this sink holds, with a fresh write time.

        The same offsets again: where the sink resumes does not move (max wins). Through
        the gate like every write; a fenced sink has nothing to re-state.
        """
        self._last_mark = time.monotonic()
        async with self._applying:
            gate, positions = self._gate, dict(self._positions)
            if gate is None or not positions:
                return
            written_ms = int(time.time() * 1000)
            markers = offset_markers(
                self.rollups_topic, positions, dict.fromkeys(positions, written_ms)
            )
            try:
                await self._write_once(orjson.dumps(markers)[1:-1], len(markers), positions)
            except SinkFencedError:
                self._fenced(gate)

    async def _write_once(self, body: bytes, count: int, applied: dict[int, int]) -> None:
        """Write, retrying failures, without ever writing the same rows twice.

        A failed INSERT may have landed anyway (a server that committed the part
        but whose reply was lost): the markers written in the same INSERT say
        whether it did, so a retry first reads them back. A failure because the
        gate is gone is no failure to retry: another sink has taken over, and
        resumed after whatever this one managed to write (SinkFencedError).
        """
        gate = self._gate
        if gate is None:
            raise SinkFencedError("no write gate: this sink holds no partitions")
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self.rollups.write_json, body, count, gate.table)
                return
            except Exception as exc:
                if not await self._alive(gate):
                    raise SinkFencedError(f"{gate.table} was dropped") from exc
                delay = retry_delay(attempt)
                log.error("sink could not write rollups (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
            try:
                stored = await asyncio.to_thread(self.rollups.resume_offsets, self.rollups_topic)
            except Exception as exc:
                log.error("sink could not read its offsets back (%s)", exc)
                continue
            if all(stored.get(p, 0) >= offset for p, offset in applied.items()):
                log.warning("sink: the failed write had landed; not writing it again")
                return

    async def _alive(self, gate: Gate) -> bool:
        """Whether `gate` still exists; an unanswered question is not a fence."""
        try:
            return await asyncio.to_thread(self.gates.alive, gate)
        except Exception as exc:
            log.error("sink could not check its gate %s (%s)", gate.table, exc)
            return True

    async def _retry(self, what: str, fn: Callable[..., T], *args: object) -> T:
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:
                delay = retry_delay(attempt)
                log.error("sink could not %s (%s); retrying in %.1fs", what, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    def stop(self) -> None:
        self._stopping.set()
