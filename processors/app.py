"""The faust-streaming app behind `tally worker`: a thin adapter around the pipeline.

Per batch of messages (faust's `noack_take`, so faust itself never commits):
for each events partition in the batch, decode, deduplicate and fold its
messages (processors/pipeline.py), then publish the partition's rollup deltas
and dead letters, and commit its consumed offset, in ONE Kafka transaction
(processors/output.py). The sink applies committed deltas to the store.

Why this order is safe at every instant:
- before the commit, nothing is visible (read_committed) and the offset is not
  committed: a crash re-reads the batch;
- the commit makes deltas, dead letters and the offset visible at once;
- a worker that lost a partition is fenced by the new owner's producer, and the
  new owner reads the committed offset only after fencing, skipping whatever
  the old owner managed to commit;
- a worker fenced while it keeps the partition (a timed-out transaction) reads
  what its consumer delivered past the committed offset again (_take_over);
- a batch counts only messages fetched under the assignment in force (_generation):
  faust's take buffer can hand over messages fetched before a rebalance, and
  counting them would take over (fence) a partition the group gave another worker;
- letting a partition go closes its output (PartitionOutput.close), which releases
  a commit in flight on it: no batch ever waits on a producer that was stopped.
Anything unexpected in this process ends it at once (crash-only): a half-done
batch is never acknowledged, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import faust
from faust.tables import TableManager
from faust.types import TP

from processors.exceptions import FencedError, OutputClosedError
from processors.output import PartitionOutput, Record, dead_letter_record
from processors.pipeline import BatchResult, Message, Pipeline
from processors.replay import Redelivered, Resumer
from processors.settings import WorkerSettings
from processors.stats import WorkerStats
from schemas.deltas import Delta, encode, encode_bodies
from schemas.failure import EXIT_UNSAFE, retry_delay
from schemas.kafka import COMPRESSION

log = logging.getLogger("tally.worker")


STOP_COMMIT_WAIT_S = 10.0


class RollupWorker:
    """Everything the agent does with a batch, kept out of faust's callbacks."""

    def __init__(self, settings: WorkerSettings, app: faust.App) -> None:
        self.settings = settings
        self.app = app
        self.stats = WorkerStats()
        self.pipeline = Pipeline(
            settings.events_topic,
            settings.limits(),
            settings.dedup_window_s,
            settings.dedup_max_keys,
        )
        self._outputs: dict[int, PartitionOutput] = {}
        self._last_commit: dict[int, float] = {}
        self._next_offset: dict[int, int] = {}
        self._closing: set[asyncio.Future[None]] = set()
        # Takeovers under way: a batch and the heartbeat may both want one partition,
        # and two producers with its transactional id would fence each other.
        self._taking: dict[int, asyncio.Future[None]] = {}
        # Per partition, how often it was revoked: a takeover that a revocation
        # overtook must not install its output (the partition may be someone else's).
        self._revocations: dict[int, int] = defaultdict(int)
        # Set by stop(): no takeover starts after it, or its producer would outlive
        # the worker (the consumer stays assigned, and the heartbeat runs, a little longer).
        self._stopping = False
        self._committing: asyncio.Future[None] | None = None
        # Per partition, the offset after the last message handed to the fold since it
        # was assigned; with the messages read again after a fence (see _take_over).
        self._delivered: dict[int, int] = {}
        self._backlog: dict[int, Redelivered] = {}
        # The consumer generation whose partitions were revoked last: until the next
        # assignment (a later generation), every message delivered is stale.
        self._revoked_generation: int | None = None
        # Batches and the heartbeat's backlog runs take turns (commits stay in order).
        self._counting = asyncio.Lock()
        self._resumer = Resumer(
            settings.bootstrap,
            settings.consumer_group,
            settings.events_topic,
            settings.rollups_topic,
        )

    async def handle(self, events: Sequence[Any]) -> None:
        try:
            await self._handle(events)
        except asyncio.CancelledError:
            raise
        except BaseException:
            # Crash-only: acknowledging nothing, a restart redoes this batch.
            log.exception("unexpected error while counting; stopping so nothing is skipped")
            os._exit(EXIT_UNSAFE)

    async def _handle(self, events: Sequence[Any]) -> None:
        received: dict[int, list[Message]] = defaultdict(list)
        keys: dict[tuple[int, int], bytes | None] = {}
        stale: dict[int, int] = defaultdict(int)
        # The loop does not yield, so the assignment in force is the same throughout.
        current = self._generation()
        for e in events:
            m = e.message
            if current is None or m.generation_id != current:  # see _generation
                stale[m.partition] += 1
                continue
            received[m.partition].append(
                Message(m.partition, m.offset, m.value, int((m.timestamp or 0) * 1000))
            )
            keys[(m.partition, m.offset)] = m.key
        if stale:  # their owner now reads them from the committed offset
            log.info("left to their owners, fetched before a rebalance: %s", dict(stale))
        async with self._counting:
            await self._count(received, keys, len(events))

    def _generation(self) -> int | None:
        """The consumer generation whose assignment is in force (None: a rebalance).

        Invariant: a batch counts (and takes over) a partition only with messages
        fetched under this generation. faust drops older messages as its stream reads
        them, but its take buffer keeps what it had read before a rebalance and yields
        it afterwards. Counted, such a message made this worker take over a partition
        the group had just given another worker, fencing that owner, which then took
        it back ("fenced while this worker still held it"), in turn. Its owner reads it
        from the committed offset; if this worker is given the partition again, its
        consumer reads it again as well.
        """
        now = int(self.app.consumer_generation_id)
        return None if now == self._revoked_generation else now

    async def _count(
        self,
        received: dict[int, list[Message]],
        keys: dict[tuple[int, int], bytes | None],
        messages: int,
    ) -> None:
        await self._take_over_all(received)
        # Messages read again after a fence precede everything delivered since.
        for partition in [p for p in self._backlog if p in self._outputs]:
            again = self._backlog.pop(partition)
            received[partition] = again.messages + received.get(partition, [])
            keys.update(again.keys)
        # A partition revoked while it was being taken over is another worker's now:
        # its messages are left to that owner, which resumes at the committed offset.
        by_partition = {p: msgs for p, msgs in received.items() if p in self._outputs and msgs}
        for partition, msgs in by_partition.items():
            last = max(m.offset for m in msgs) + 1
            self._delivered[partition] = max(self._delivered.get(partition, 0), last)
        # The outputs this batch is folded against. A partition dropped (fenced, revoked)
        # and taken over again before this batch's commit runs has a new output and a
        # new resume point: rows folded from the old state must not go through it.
        outputs = {p: self._outputs[p] for p in by_partition}
        # The fold allocates about a million containers per batch, none of them in a
        # cycle, and most live until the batch is committed: the cyclic collector would
        # walk them again and again for nothing (~1 CPU µs per event in the processor
        # bench). Reference counting frees them; collections resume after the fold.
        collecting = gc.isenabled()
        gc.disable()
        try:
            results = {p: self.pipeline.process(msgs) for p, msgs in by_partition.items()}
        finally:
            if collecting:
                gc.enable()
        # Pipelined: the previous batch's transactions ran while this one was folded.
        # Waiting for them before starting this batch's keeps each partition's
        # transactions in order, one batch at a time, as when every batch waited for
        # its own commits (a later batch's offset must never be committed first).
        await self._settle_commits()
        self._committing = asyncio.ensure_future(self._commit_all(results, keys, outputs, messages))

    async def _settle_commits(self) -> None:
        committing, self._committing = self._committing, None
        if committing is not None:
            await committing

    async def _commit_all(
        self,
        results: dict[int, BatchResult],
        keys: dict[tuple[int, int], bytes | None],
        outputs: dict[int, PartitionOutput],
        messages: int,
    ) -> None:
        try:
            await asyncio.gather(
                *(self._commit(p, r, keys, outputs[p]) for p, r in results.items())
            )
        except asyncio.CancelledError:
            raise
        except BaseException:
            # Crash-only, as in handle(): nothing of this batch is acknowledged.
            log.exception("unexpected error while committing; stopping so nothing is skipped")
            os._exit(EXIT_UNSAFE)
        stats = self.stats
        stats.messages += messages
        stats.flushes += 1
        stats.last_flush_unix = time.time()
        for result in results.values():
            stats.counted += result.counted
            stats.duplicates += result.duplicates
            stats.replayed += result.replayed
            stats.dead_letters += len(result.dead_letters)
            for kind, n in result.by_type.items():
                stats.by_type[kind] = stats.by_type.get(kind, 0) + n
            for letter in result.dead_letters:
                reason = letter.rejection.reason
                stats.dlq_by_reason[reason] = stats.dlq_by_reason.get(reason, 0) + 1

    async def _take_over_all(self, partitions: Iterable[int]) -> None:
        """Take over each partition not owned yet, once however many callers ask.

        Side by side: a rebalance hands over many partitions at once, and each takeover
        is several round trips to the coordinator; one after another, they add up.
        """
        waits: list[asyncio.Future[None]] = []
        for partition in partitions:
            if partition in self._outputs or self._stopping:
                continue
            taking = self._taking.get(partition)
            if taking is None:
                taking = asyncio.ensure_future(self._take_over(partition))
                self._taking[partition] = taking
                taking.add_done_callback(functools.partial(self._took_over, partition))
            waits.append(taking)
        if waits:
            await asyncio.gather(*waits)

    def _took_over(self, partition: int, _: asyncio.Future[None]) -> None:
        self._taking.pop(partition, None)

    async def _take_over(self, partition: int) -> None:
        """Fence the previous owner, then learn where counting resumes, in that order."""
        output = PartitionOutput(
            self.settings.bootstrap,
            self.settings.consumer_group,
            self.settings.events_topic,
            partition,
            COMPRESSION,
        )
        generation = self._revocations[partition]
        try:
            await output.start()
            committed = await self._resumer.committed(partition)
            self.pipeline.resume(partition, committed)
            async with self._resumer.lock:  # replays take turns with the shared consumer
                remembered = await self._resumer.replay(
                    partition,
                    committed,
                    self.settings.dedup_window_s,
                    self.settings.dedup_replay_max_messages,
                    lambda value: self.pipeline.remember(partition, value),
                )
                # Delivered to this worker past the committed offset and never counted:
                # its producer was fenced but the group left it the partition, so its
                # consumer will not deliver them again.
                delivered = self._delivered.get(partition, committed)
                again = None
                if delivered > committed:
                    again = await self._resumer.redeliver(partition, committed, delivered)
        except BaseException:
            await output.close()  # the next attempt starts (and fences) afresh
            raise
        if self._revocations[partition] != generation:
            # Revoked meanwhile: a later assignment takes it over again, from scratch.
            self.pipeline.forget(partition)
            await output.close()
            return
        self.stats.remembered += remembered
        if again is not None:
            log.warning(
                "partition %d: fenced while this worker still held it (a transaction "
                "timed out?); counting its %d messages from offset %d again",
                partition,
                len(again.messages),
                committed,
            )
            self._backlog[partition] = again
        self._outputs[partition] = output
        self._next_offset[partition] = committed
        log.info(
            "partition %d: counting resumes at offset %d (%d earlier messages re-read for dedup)",
            partition,
            committed,
            remembered,
        )

    async def _commit(
        self,
        partition: int,
        result: BatchResult,
        keys: dict[tuple[int, int], bytes | None],
        output: PartitionOutput,
    ) -> None:
        next_offset = result.next_offsets.get(partition)
        if next_offset is None:  # the whole batch was below the resume offset
            return
        reflected = self._reflected_ms(partition, next_offset, result.published_until_ms)
        records: list[Record] = [
            (self.settings.rollups_topic, None, value, partition, [])
            for value in encode_bodies(partition, next_offset, reflected, result.bodies)
        ]
        topics = self.settings.events_topic, self.settings.dlq_topic
        records.extend(
            dead_letter_record(letter, keys.get((letter.partition, letter.offset)), *topics)
            for letter in result.dead_letters
        )
        if await self._transact(partition, records, next_offset, output):
            self._next_offset[partition] = next_offset

    async def _transact(
        self, partition: int, records: list[Record], offset: int | None, output: PartitionOutput
    ) -> bool:
        attempt = 0
        while True:
            if self._outputs.get(partition) is not output:
                return False  # dropped meanwhile: the new owner re-reads it
            try:
                started = time.perf_counter()
                async with output.lock:
                    await output.commit(records, offset)
                self.stats.commit_seconds.observe(time.perf_counter() - started)
                self.stats.transactions += 1
                self._last_commit[partition] = time.monotonic()
                return True
            except OutputClosedError:
                return False  # dropped mid-commit: the next owner settles and re-reads it
            except FencedError:
                # Usually a rebalance gave it to another worker; if the group left it
                # here (a timed-out transaction), _take_over counts it again.
                log.info("partition %d: this worker's producer was fenced", partition)
                self.stats.fenced += 1
                if self._outputs.get(partition) is output:  # not a later takeover's
                    self._drop(partition)
                return False
            except Exception as exc:
                delay = retry_delay(attempt)
                log.error(
                    "partition %d: could not commit (%r); retrying in %.1fs, offsets held",
                    partition,
                    exc,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
                if offset is not None and await self._went_through(output, partition, offset):
                    self.stats.transactions += 1
                    self._last_commit[partition] = time.monotonic()
                    return True

    async def _went_through(self, output: PartitionOutput, partition: int, offset: int) -> bool:
        """Whether a transaction whose commit raised was committed after all.

        A commit can fail after the coordinator recorded it (the EndTxn reply
        lost, a broker restart mid-commit): the coordinator then completes it.
        Sending the same records again would count the batch twice (what
        tests/e2e/test_faults.py's kills provoke). A fresh producer's InitProducerId
        waits until the earlier transaction is committed or aborted; only then do the
        witnesses say which.
        False (retry the batch) when it was aborted or the answer is unknown yet.
        """
        if self._outputs.get(partition) is not output:
            return False  # revoked meanwhile: starting its producer would fence the new owner
        try:
            async with output.lock:
                await output.stop()
                await output.start()
                committed = await self._resumer.committed(partition)
        except OutputClosedError:
            return False  # dropped while this waited: the next owner settles it
        except Exception as exc:
            log.error("partition %d: could not learn the commit's outcome (%r)", partition, exc)
            await output.stop()  # the next attempt starts (and fences) afresh
            return False
        if committed >= offset:
            log.warning(
                "partition %d: the failed commit up to offset %d had gone through; "
                "not sending it again",
                partition,
                offset,
            )
            return True
        return False

    async def heartbeat(self) -> None:
        """Tell the sink that idle, caught-up partitions are current.

        An idle partition commits nothing, yet its data is fresh; without this
        `meta.updated_at` would age while nothing is behind. Assigned partitions
        that no batch has touched yet are taken over here, so a worker reports from
        its first seconds even when no event was ever sent: /readyz sees it.
        """
        assigned = self._assigned()
        if assigned is None:
            return
        try:
            await self._take_over_all(sorted(assigned))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Nothing was counted: the next tick (or the next batch) takes over afresh.
            log.error("could not take over idle partitions (%r); retrying", exc)
            return
        if self._backlog:  # messages read again after a fence, with no batch to carry them
            await self.handle([])
        due = time.monotonic() - self.settings.worker_flush_interval_s
        beats = []
        for partition, output in list(self._outputs.items()):
            if partition not in assigned:
                continue  # revoked meanwhile: the new owner reports it
            if self._last_commit.get(partition, 0.0) > due or output.lock.locked():
                continue
            offset = self._next_offset.get(partition, 0)
            if not self._caught_up(partition, offset):
                continue
            delta = Delta(partition, offset, int(time.time() * 1000), [])
            records: list[Record] = [
                (self.settings.rollups_topic, None, value, partition, []) for value in encode(delta)
            ]
            beats.append(self._transact(partition, records, None, output))
        # Side by side: each partition has its own producer, and one after another
        # eight idle partitions took longer than the flush interval.
        await asyncio.gather(*beats)

    def _assigned(self) -> set[int] | None:
        """The events partitions the group gave this worker (None: not known yet).

        None from a revocation until the next assignment: the consumer still reports
        the revoked partitions then, and a takeover started from them would fence
        their next owner (see _generation).
        """
        if self._generation() is None:
            return None
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # consumer not started yet
            return None
        return {tp.partition for tp in assignment if tp.topic == self.settings.events_topic}

    def on_revoked(self, partitions: set[int]) -> None:
        # Whatever the consumer delivered until now was fetched under this assignment.
        self._revoked_generation = int(self.app.consumer_generation_id)
        for partition in partitions:
            self._revocations[partition] += 1
            self._delivered.pop(partition, None)
            self._backlog.pop(partition, None)
            self._drop(partition)

    def _drop(self, partition: int) -> None:
        self.pipeline.forget(partition)
        self._next_offset.pop(partition, None)
        output = self._outputs.pop(partition, None)
        if output is not None:
            # Closing may wait on the network; the callback must not. It also releases
            # a commit in flight on this output (PartitionOutput.close).
            task = asyncio.ensure_future(output.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _caught_up(self, partition: int, next_offset: int) -> bool:
        try:
            highwater = self.app.consumer.highwater(TP(self.settings.events_topic, partition))
        except Exception:  # consumer not ready, partition not fetched yet
            return False
        return highwater is not None and next_offset >= highwater

    def _reflected_ms(self, partition: int, next_offset: int, published: dict[int, int]) -> int:
        """Time up to which this partition's events are counted (for freshness)."""
        if self._caught_up(partition, next_offset):
            return int(time.time() * 1000)
        return published.get(partition, 0)

    def lag(self) -> dict[int, int]:
        """Per partition this worker counts: messages in the log not yet committed.

        Read at scrape time from the consumer's last fetched highwater (no request).
        """
        lag: dict[int, int] = {}
        for partition, position in list(self._next_offset.items()):
            try:
                highwater = self.app.consumer.highwater(TP(self.settings.events_topic, partition))
            except Exception:  # consumer not ready, partition not fetched yet
                continue
            if highwater is not None:
                lag[partition] = max(0, highwater - position)
        return lag

    async def stop(self) -> None:
        self._stopping = True
        taking = list(self._taking.values())
        for task in taking:
            task.cancel()  # a cancelled takeover stops its own producer
        await asyncio.gather(*taking, return_exceptions=True)
        committing, self._committing = self._committing, None
        if committing is not None:
            # Let the last batch's transactions finish; one that cannot (Kafka gone)
            # is aborted with its producer below, and its offsets stay uncommitted.
            await asyncio.wait([committing], timeout=STOP_COMMIT_WAIT_S)
        for partition in list(self._outputs):
            output = self._outputs.pop(partition)
            await output.close()
        await self._resumer.stop()


class NoTablesManager(TableManager):
    """faust's table manager without its one-second wait at start.

    faust sleeps 1 s before starting table recovery so that tables declared late
    are included. The worker declares no tables (its state lives in Kafka
    transactions and ClickHouse), so the wait only delays every start, restart
    and takeover by a second.
    """

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def build_app(settings: WorkerSettings) -> tuple[faust.App, RollupWorker]:
    datadir = settings.data_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{settings.bootstrap}",
        web_enabled=False,
        store="memory://",
        # faust keeps a small state folder; keep it with Tally's data, not in the cwd.
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        # The launcher (or the operator) owns topic layout; faust must not
        # re-declare the events topic with its own partition count.
        topic_allow_declare=False,
        topic_disable_leader=True,
        stream_wait_empty=False,
        # 1 MiB per partition (aiokafka's default), not 8: the first fetch after a start
        # or a takeover answers sooner (the whole response must arrive before a batch
        # can fold), and catching up measured no slower (benchmarks/NOTES.md).
        consumer_max_fetch_size=1024 * 1024,
        # A dead worker's partitions move to the others after this long.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        # Offsets are committed inside our transactions, never by faust, so
        # faust's "nothing committed for a while" alarm would only cry wolf.
        broker_commit_livelock_soft_timeout=10**9,
        TableManager=NoTablesManager,
    )
    worker = RollupWorker(settings, app)
    topic = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,
    )

    @app.agent(topic, name="tally.count")
    async def rollups(stream: Any) -> None:
        async for events in stream.noack_take(
            settings.worker_batch_messages, within=settings.worker_flush_interval_s
        ):
            await worker.handle(events)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[Any] = args[0] if args else kwargs.get("revoked", set())
        worker.on_revoked({tp.partition for tp in revoked if tp.topic == settings.events_topic})

    async def heartbeat() -> None:
        # A loop, not app.timer: a round that outlasts the interval (a loaded
        # machine, a takeover) simply delays the next one instead of overlapping it.
        while not app.should_stop:
            await worker.heartbeat()
            await app.sleep(settings.worker_flush_interval_s)

    app.task(heartbeat)

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await worker.stop()

    return app, worker
