"""Where a newly assigned partition resumes, and what it must remember (adapter).

When a worker takes partition p, it first fences p's previous owner (see
processors/output.py), then learns where counting resumes: everything below
that offset was counted, in a committed transaction. Two witnesses say where:
the group's committed offset, and the `next_offset` of the last committed delta
on rollups partition p (written in the same transaction). The larger wins: the
group offset can read one batch behind after a `kill -9` of worker and broker
together (tests/e2e/test_faults.py kills both), while the rollups log,
read_committed, cannot be behind its own transactions. To recognise re-sends of counted events, the
worker then re-reads the dedup window before that offset, without counting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from processors.pipeline import Message
from schemas.deltas import read

log = logging.getLogger("tally.worker")


class Redelivered(NamedTuple):
    """Messages read again (Resumer.redeliver), with their keys for dead letters."""

    messages: list[Message]
    keys: dict[tuple[int, int], bytes | None]


class Resumer:
    def __init__(self, bootstrap: str, group: str, topic: str, rollups_topic: str) -> None:
        self.topic = topic
        self.rollups_topic = rollups_topic
        self._bootstrap = bootstrap
        self._group = group
        self._consumer: AIOKafkaConsumer | None = None
        # One shared consumer: `replay` assigns it a partition, so replays take turns
        # (callers hold `lock`); `committed` only asks, and may run beside anything.
        self.lock = asyncio.Lock()
        self._creating = asyncio.Lock()

    async def _ready(self) -> AIOKafkaConsumer:
        # Created here, inside the running loop (aiokafka binds to it); once, however
        # many takeovers ask at the same time.
        async with self._creating:
            if self._consumer is None:
                # Never joins the group (no subscribe) and never commits: it only
                # reads the group's committed offsets and re-reads history.
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=self._group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    max_partition_fetch_bytes=8 * 1024 * 1024,
                )
                await consumer.start()
                self._consumer = consumer
            return self._consumer

    async def committed(self, partition: int) -> int:
        """The next offset to count (see the module docstring)."""
        consumer = await self._ready()
        tp = TopicPartition(self.topic, partition)
        offset = await consumer.committed(tp)
        if offset is None:
            offset = (await consumer.beginning_offsets([tp]))[tp]
        counted = await self._last_delta_offset(partition)
        if counted is not None and counted != offset:
            log.warning(
                "partition %d: the group's committed offset %d disagrees with the last "
                "committed delta (%d); resuming at the larger",
                partition,
                offset,
                counted,
            )
        return max(int(offset), counted or 0)

    async def _last_delta_offset(self, partition: int) -> int | None:
        """`next_offset` of the last complete delta committed for `partition`."""
        tail = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await tail.start()
        try:
            tp = TopicPartition(self.rollups_topic, partition)
            tail.assign([tp])
            end = (await tail.end_offsets([tp]))[tp]
            start = (await tail.beginning_offsets([tp]))[tp]
            found: int | None = None
            # Walk back in windows until a final delta turns up (a split delta's
            # earlier chunks say nothing about where the batch ended).
            window = 64
            upper = end
            while found is None and upper > start:
                lower = max(start, upper - window)
                tail.seek(tp, lower)
                while (position := await tail.position(tp)) < upper:
                    records = (await tail.getmany(tp, timeout_ms=1_000)).get(tp, [])
                    if not records:
                        if position >= (await tail.end_offsets([tp]))[tp]:
                            break  # only transaction markers remain
                        continue
                    for record in records:
                        if record.offset >= upper:
                            break
                        delta = read(record.value)  # the header only, any wire version
                        if delta.final and delta.partition == partition:
                            found = max(found or 0, delta.next_offset)
                upper = lower
                window *= 4
            return found
        finally:
            await tail.stop()

    async def replay(
        self,
        partition: int,
        end_offset: int,
        window_s: float,
        max_messages: int,
        feed: Callable[[bytes | None], None],
    ) -> int:
        """Feed the values of up to `max_messages` messages published within
        `window_s` before now and below `end_offset`; return how many."""
        consumer = await self._ready()
        tp = TopicPartition(self.topic, partition)
        found = await consumer.offsets_for_times({tp: int((time.time() - window_s) * 1000)})
        stamp = found.get(tp)
        start = stamp.offset if stamp is not None else end_offset
        start = max(start, end_offset - max_messages)
        if start >= end_offset:
            return 0
        consumer.assign([tp])
        consumer.seek(tp, start)
        try:
            return await self._read(consumer, tp, end_offset, lambda record: feed(record.value))
        finally:
            consumer.unsubscribe()

    async def redeliver(self, partition: int, start: int, end_offset: int) -> Redelivered:
        """The messages of `partition` from `start` up to `end_offset`, read again.

        For a partition whose producer was fenced while the group left it with this
        worker (a transaction the coordinator timed out): its consumer delivered
        these already, they were not counted, and it will not deliver them again.
        """
        consumer = await self._ready()
        tp = TopicPartition(self.topic, partition)
        found = Redelivered([], {})

        def keep(record: ConsumerRecord[bytes, bytes]) -> None:
            found.messages.append(
                Message(partition, record.offset, record.value, record.timestamp or 0)
            )
            found.keys[(partition, record.offset)] = record.key

        consumer.assign([tp])
        consumer.seek(tp, start)
        try:
            await self._read(consumer, tp, end_offset, keep)
        finally:
            consumer.unsubscribe()
        return found

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        end_offset: int,
        feed: Callable[[ConsumerRecord[bytes, bytes]], None],
    ) -> int:
        fed = 0
        while True:
            batches = await consumer.getmany(tp, timeout_ms=1_000, max_records=5_000)
            records = batches.get(tp, [])
            if not records and await consumer.position(tp) >= end_offset:
                break
            for record in records:
                if record.offset >= end_offset:
                    return fed
                feed(record)
                fed += 1
                if record.offset + 1 >= end_offset:
                    return fed
            if not records:
                # No data yet below end_offset: nothing more can come.
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    break
        return fed

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
