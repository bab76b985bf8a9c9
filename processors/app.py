"""The faust-streaming app behind `tally worker`: a thin adapter around the pipeline.

Per batch of messages (faust's `take_events`): decode, deduplicate and fold them
(processors/pipeline.py), send rejections to the dead-letter topic and wait for
Kafka to acknowledge them, then write deltas plus offset markers in one INSERT.
Only after that does the batch leave `take_events`, which is when faust acks the
messages and may commit their offsets. A crash at any point therefore replays
from a committed offset at or below the stored markers, and the markers keep the
replay from counting anything twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from faust.types import TP

from processors.decode import Limits
from processors.pipeline import DeadLetter, Message, Pipeline
from processors.rollup import EPOCH, marker_rows
from processors.settings import WorkerSettings
from processors.sink import RollupSink
from schemas.store import Store

log = logging.getLogger("tally.worker")

# Backoff while the store refuses writes: the batch is held (offsets not acked),
# so nothing is lost, and the worker resumes as soon as the store is back.
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)

# A dead letter must fit in one Kafka record (brokers default to ~1 MB). Larger
# originals (only `oversized` ones can be) keep their first bytes, and the
# `tally-original-bytes` header says how long they were.
DLQ_MAX_VALUE_BYTES = 900_000


@dataclass
class WorkerStats:
    messages: int = 0
    counted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    replayed: int = 0
    flushes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    last_flush_unix: float = 0.0


class RollupWorker:
    """Everything the agent does with a batch, kept out of faust's callbacks."""

    def __init__(self, settings: WorkerSettings, store: Store, app: faust.App) -> None:
        self.settings = settings
        self.app = app
        self.sink = RollupSink(store)
        self.stats = WorkerStats()
        # Serialises flushes and heartbeats: a heartbeat must only re-state
        # offsets whose deltas are already in the store.
        self._write_lock = asyncio.Lock()
        self._written: dict[int, int] = {}
        self.pipeline = Pipeline(
            settings.events_topic,
            Limits(
                max_message_bytes=settings.max_message_bytes,
                max_event_bytes=settings.max_event_bytes,
                max_future=timedelta(seconds=settings.max_future_s),
                max_lateness=timedelta(seconds=settings.max_lateness_s),
            ),
            settings.dedup_window_s,
            settings.dedup_max_keys,
        )

    async def handle(self, events: Sequence[Any]) -> None:
        messages = [
            Message(
                e.message.partition,
                e.message.offset,
                e.message.value,
                int((e.message.timestamp or 0) * 1000),
            )
            for e in events
        ]
        keys = {(e.message.partition, e.message.offset): e.message.key for e in events}
        async with self._write_lock:
            await self._resume_new_partitions({m.partition for m in messages})
            result = self.pipeline.process(messages)
            await self._dead_letter(result.dead_letters, keys)
            reflected = {
                p: self._reflected_until(p, offset, result.published_until_ms.get(p, 0))
                for p, offset in result.next_offsets.items()
            }
            markers = marker_rows(self.settings.events_topic, result.next_offsets, reflected)
            await self._write(result.rows + markers)
            self._written.update(result.next_offsets)
        stats = self.stats
        stats.messages += len(messages)
        stats.counted += result.counted
        stats.duplicates += result.duplicates
        stats.replayed += result.replayed
        stats.dead_letters += len(result.dead_letters)
        stats.flushes += 1
        stats.last_flush_unix = time.time()
        for kind, n in result.by_type.items():
            stats.by_type[kind] = stats.by_type.get(kind, 0) + n
        for letter in result.dead_letters:
            reason = letter.rejection.reason
            stats.dlq_by_reason[reason] = stats.dlq_by_reason.get(reason, 0) + 1

    def on_revoked(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.pipeline.forget(partition)
            self._written.pop(partition, None)

    async def heartbeat(self) -> None:
        """Re-state the markers of caught-up partitions with the time now.

        An idle partition gets no flushes, yet its data is current; without this
        `meta.updated_at` would age while nothing is behind. Only offsets already
        written are re-stated, so a heartbeat can never cover uncounted events.
        """
        async with self._write_lock:
            caught_up = {
                p: offset
                for p, offset in self._written.items()
                if self._reflected_until(p, offset, 0) != EPOCH
            }
            if not caught_up:
                return
            now = datetime.now(UTC)
            markers = marker_rows(
                self.settings.events_topic, caught_up, dict.fromkeys(caught_up, now)
            )
            await self._write(markers)

    def _reflected_until(self, partition: int, next_offset: int, published_ms: int) -> datetime:
        """Time up to which this partition's events are counted (for freshness)."""
        try:
            highwater = self.app.consumer.highwater(TP(self.settings.events_topic, partition))
        except Exception:  # consumer not ready, partition not fetched yet
            highwater = None
        if highwater is not None and next_offset >= highwater:
            return datetime.now(UTC)
        if published_ms:
            return datetime.fromtimestamp(published_ms / 1000, UTC)
        return EPOCH

    async def _resume_new_partitions(self, partitions: set[int]) -> None:
        new = [p for p in partitions if not self.pipeline.knows(p)]
        if not new:
            return
        stored = await self._retry(
            "read offset markers", self.sink.resume_offsets, self.settings.events_topic
        )
        for partition in new:
            self.pipeline.resume(partition, stored.get(partition, 0))
            if partition in stored:
                self._written[partition] = stored[partition]
            log.info(
                "partition %d resumes counting at offset %d", partition, stored.get(partition, 0)
            )

    async def _dead_letter(
        self, letters: list[DeadLetter], keys: dict[tuple[int, int], bytes | None]
    ) -> None:
        if not letters:
            return
        producer = self.app.producer
        pending = []
        for letter in letters:
            rejection = letter.rejection
            headers = [
                ("tally-reason", rejection.reason.encode()),
                ("tally-detail", rejection.detail[:1000].encode()),
                ("tally-source-topic", self.settings.events_topic.encode()),
                ("tally-source-partition", str(letter.partition).encode()),
                ("tally-source-offset", str(letter.offset).encode()),
            ]
            if rejection.index is not None:
                headers.append(("tally-batch-index", str(rejection.index).encode()))
            value = rejection.raw
            if len(value) > DLQ_MAX_VALUE_BYTES:
                headers.append(("tally-original-bytes", str(len(value)).encode()))
                value = value[:DLQ_MAX_VALUE_BYTES]
            pending.append(
                await producer.send(
                    self.settings.dlq_topic,
                    keys.get((letter.partition, letter.offset)),
                    value,
                    None,
                    None,
                    headers,
                )
            )
        # Acknowledged before the rollup write: a crash in between re-sends them
        # (a duplicate dead letter), never loses one.
        await asyncio.gather(*pending)

    async def _write(self, rows: list[list[object]]) -> None:
        await self._retry("write rollups", self.sink.write, rows)

    async def _retry(self, what: str, fn: Any, *args: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                log.error("could not %s (%s); retrying in %.1fs, offsets held", what, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)


def build_app(settings: WorkerSettings, store: Store) -> tuple[faust.App, RollupWorker]:
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{settings.bootstrap}",
        web_enabled=False,
        store="memory://",
        consumer_auto_offset_reset="earliest",
        # The launcher (or the operator) owns topic layout; faust must not
        # re-declare the events topic with its own partition count.
        topic_allow_declare=False,
        topic_disable_leader=True,
        producer_acks=-1,
        stream_wait_empty=False,
        broker_commit_interval=1.0,
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    worker = RollupWorker(settings, store, app)
    topic = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,
    )

    @app.agent(topic, name="tally.rollups")
    async def rollups(stream: Any) -> None:
        async for events in stream.take_events(
            settings.worker_batch_messages, within=settings.worker_flush_interval_s
        ):
            await worker.handle(events)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[Any] = args[0] if args else kwargs.get("revoked", set())
        worker.on_revoked({tp.partition for tp in revoked if tp.topic == settings.events_topic})

    async def heartbeat() -> None:
        await worker.heartbeat()

    app.timer(settings.worker_flush_interval_s)(heartbeat)

    return app, worker
