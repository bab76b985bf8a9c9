"""What keeps a replica's usage view exact: the committed deltas and a poll of
accounts and keys (query_api/view.py says why every API process holds a view).

**Deltas.** After `UsageView.load` the view holds the store's rollups as of the
sink's offset markers read in the same statement (`Snapshot`): per `tally.rollups`
partition the next offset not applied, per events partition the offset its events
are counted to. `ViewFeed` assigns itself every `tally.rollups` partition (no
consumer group, nothing committed: the snapshot says where to start), reads with
isolation_level=read_committed (what the sink reads: committed worker transactions
only), seeks each partition to its marker and applies each record by the sink's
own rules (`FeedPosition`, mirroring `processors.sink.Sink._apply`; a worker sends
events partition p's deltas to rollups partition p, so each arrives in one order):

- a record below the partition's next offset is in the snapshot (or was applied
  already): skipped, so nothing the snapshot holds is counted twice;
- a delta whose `next_offset` is at or below what its events partition is counted
  to holds events counted already (a batch committed twice upstream): its rows are
  skipped, as the sink skips them, while its freshness still counts;
- the final message of a delta moves its events partition's freshness and counted
  offset; earlier chunks only add rows.

The sink applies the same records once in the same order per partition, from the
same markers, so the view equals what the store holds once the sink catches up
(it may be ahead of it, never different from it).

**Accounts and keys.** Admin writes made through this process reach its view at
once; those of other processes (other replicas, `tally admin`) by a poll every
`ACCOUNTS_POLL_S`: rows whose version is above the newest version seen minus
`OVERLAP_NS`, read with FINAL (the winning row of each changed id). Applying a row
is idempotent and only a higher version replaces what is held, so a re-read row, or
a poll answer that raced a local write, changes nothing. The overlap covers a row
that becomes visible after a newer one (an INSERT in flight, writers' clocks apart
by less than it). Propagation is one poll interval plus one statement: well under
the 1 s bound (tests/integration/test_api_replicas.py measures it). Each read is
gated by a fingerprint of the rows in its window (count and XOR of hashes of id and
version, one aggregate row): when neither the window's start nor its fingerprint
moved since the last read, nothing new is visible and the rows are not read again.
So after a bulk load (100,000 accounts created at once) the poll does not re-read
and re-apply every one of them four times a second for the length of the overlap.
The fingerprint is taken before the rows are read, so a row landing in between is
in the read and changes the next fingerprint: at worst one read too many, never one
too few. It never runs on the usage path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from query_api.view import UsageView
from query_api.view_rows import AccountChange, KeyChange, Snapshot
from schemas.deltas import read
from schemas.failure import retry_delay
from schemas.store import Store

log = logging.getLogger("tally.api.view")

ACCOUNTS_POLL_S = 0.25
"""How often accounts and keys written by other processes are read."""
OVERLAP_NS = 30 * 1_000_000_000
"""Each poll re-reads rows this much older (in version, i.e. nanoseconds) than the
newest it has seen: a row committed late, or by a writer whose clock is behind."""
MAX_RECORDS = 500
"""Records per fetch: each is applied on the event loop, between usage answers."""
YIELD_AFTER_S = 0.005
"""Longest the feed applies records before letting waiting requests run."""

ACCOUNT_CHANGES = (
    "SELECT id, plan, billing_anchor_day, created_at, version FROM accounts FINAL "
    "WHERE id IN (SELECT id FROM accounts WHERE version > {since:UInt64})"
)
KEY_CHANGES = (
    "SELECT prefix, key_hash, account, is_admin, revoked_at IS NOT NULL, version "
    "FROM api_keys FINAL "
    "WHERE prefix IN (SELECT prefix FROM api_keys WHERE version > {since:UInt64})"
)
ACCOUNT_WINDOW = (
    "SELECT count(), groupBitXor(cityHash64(id, version)) FROM accounts "
    "WHERE version > {since:UInt64}"
)
KEY_WINDOW = (
    "SELECT count(), groupBitXor(cityHash64(prefix, version)) FROM api_keys "
    "WHERE version > {since:UInt64}"
)


Applied = Callable[[Sequence[Sequence[Any]], Mapping[int, int]], None]
"""What a feed listener is called with: the wire rows the view applied (account
first) and, per events partition, the time (epoch ms) it now reflects."""


class Fold(NamedTuple):
    """One record as the view applies it: wire rows and fresh events partitions."""

    rows: list[list[Any]]
    fresh: dict[int, int]


class FeedPosition:
    """Where the view stands in `tally.rollups` and what it has counted (pure).

    Starts at the snapshot the view was loaded from; `fold` decides each record by
    the sink's rules (module docstring) and moves the position past it.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.next: dict[int, int] = dict(snapshot.rollups)
        """Per rollups partition, the next offset to apply (absent: from the beginning)."""
        self.counted: dict[int, int] = dict(snapshot.counted)
        """Per events partition, the offset up to which its events are counted."""
        self.duplicates = 0
        """Deltas skipped as already counted (the sink skips them too)."""

    def fold(self, partition: int, offset: int, value: bytes) -> Fold | None:
        """The record at `offset` of rollups partition `partition`, or None when the
        view holds it already."""
        if offset < self.next.get(partition, 0):
            return None
        frame = read(value)
        self.next[partition] = offset + 1
        rows: list[list[Any]] = []
        if frame.count and frame.next_offset <= self.counted.get(frame.partition, -1):
            self.duplicates += 1
        elif frame.count:
            rows = frame.wire_rows()
        fresh: dict[int, int] = {}
        if frame.final:
            fresh[frame.partition] = frame.reflected_ms
            counted = self.counted.get(frame.partition, -1)
            self.counted[frame.partition] = max(counted, frame.next_offset)
        return Fold(rows, fresh)


@dataclass
class FeedStats:
    records: int = 0
    """Records applied (or found held already) since the feed started."""
    polls: int = 0
    last_poll_unix: float = 0.0
    connected: bool = False
    positions: dict[int, int] = field(default_factory=dict)


class ViewFeed:
    """Keeps one `UsageView` exact: deltas from Kafka, accounts and keys by poll.

    `start()` from inside the running loop, `await stop()` to end it. Kafka or the
    store being away is retried quietly: the view keeps answering what it holds, and
    its freshness (`meta.updated_at`, `X-Data-Delay`) shows how far behind it is.
    """

    def __init__(
        self,
        view: UsageView,
        store: Store,
        bootstrap: str,
        rollups_topic: str,
        poll_s: float = ACCOUNTS_POLL_S,
    ) -> None:
        self.view = view
        self.store = store
        self.bootstrap = bootstrap
        self.rollups_topic = rollups_topic
        self.poll_s = poll_s
        self.stats = FeedStats()
        self.position: FeedPosition | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Applied] = []
        self._windows: dict[str, tuple[int, tuple[Any, ...]]] = {}

    def add_listener(self, listener: Applied) -> None:
        """Call `listener` with each record's rows and fresh partitions once the view
        holds them (the alert evaluator in `tally up` reads the view right after)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.run(), name="tally-view-feed")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Load the view (unless loaded), then follow deltas and poll until cancelled.

        No poll on the embedded store: one process holds it, so every account and key
        written there is this process's own write, which reaches the view directly.
        Polling would only re-read the last OVERLAP_NS of writes, all of them after a
        bulk load (100,000 accounts made just before the API bench: its p99 went from
        6.7 to 264 ms).
        """
        await asyncio.to_thread(self.view.ensure_loaded, self.store)
        self.position = FeedPosition(self.view.snapshot)
        polling = [] if self.store.embedded else [self._poll()]
        await asyncio.gather(self._follow(self.position), *polling)

    # -- deltas ----------------------------------------------------------------------

    async def _follow(self, position: FeedPosition) -> None:
        attempt = 0
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                isolation_level="read_committed",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id="tally-api-view",
                max_partition_fetch_bytes=8 * 1024 * 1024,
            )
            try:
                await consumer.start()
                await self._assign(consumer, position)
                if not self.stats.connected:
                    log.info(
                        "usage view follows %s from %s",
                        self.rollups_topic,
                        f"offsets {dict(sorted(position.next.items()))}"
                        if position.next
                        else "the beginning",
                    )
                self.stats.connected = True
                attempt = 0
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
                    await self._apply(position, batches)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.connected = False
                delay = retry_delay(attempt)
                # Quiet while Kafka starts or moves leaders; loud once it lasts.
                level = logging.WARNING if attempt >= 5 else logging.INFO
                log.log(level, "usage view: reading %s failed (%s); retrying in %.1fs",
                        self.rollups_topic, exc, delay)  # fmt: skip
                attempt += 1
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _assign(self, consumer: AIOKafkaConsumer, position: FeedPosition) -> None:
        """Every partition, each from where the view stands."""
        while True:
            partitions = consumer.partitions_for_topic(self.rollups_topic)
            if partitions:
                break
            # The topic appears once a worker (or `tally topics`) creates it.
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.5)
        tps = [TopicPartition(self.rollups_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            start = position.next.get(tp.partition)
            if start is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start)

    async def _apply(
        self, position: FeedPosition, batches: Mapping[TopicPartition, list[Any]]
    ) -> None:
        view = self.view
        since_yield = time.perf_counter()
        for tp, records in batches.items():
            for record in records:
                fold = position.fold(tp.partition, record.offset, record.value)
                self.stats.records += 1
                if fold is not None and (fold.rows or fold.fresh):
                    view.apply(fold.rows, fold.fresh)
                    for listener in self._listeners:
                        listener(fold.rows, fold.fresh)
                if time.perf_counter() - since_yield > YIELD_AFTER_S:
                    # A backlog (a replica starting behind) must not hold usage
                    # answers waiting on the loop.
                    await asyncio.sleep(0)
                    since_yield = time.perf_counter()
        self.stats.positions = dict(position.next)

    # -- accounts and keys -----------------------------------------------------------

    async def _poll(self) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await asyncio.to_thread(self.poll_once)
                attempt = 0
            except Exception as exc:
                level = logging.WARNING if attempt >= 5 else logging.INFO
                log.log(level, "usage view: polling accounts and keys failed (%s)", exc)
                attempt += 1
                await asyncio.sleep(retry_delay(attempt))

    def poll_once(self) -> None:
        """Apply accounts and keys changed since the newest version held (minus the
        overlap). Blocking: runs in a thread."""
        versions = self.view.versions
        accounts = self._changed(ACCOUNT_WINDOW, ACCOUNT_CHANGES, versions.newest_account)
        keys = self._changed(KEY_WINDOW, KEY_CHANGES, versions.newest_key)
        if accounts:
            self.view.sync_accounts(_accounts(accounts))
        if keys:
            self.view.sync_keys(_keys(keys))
        self.stats.polls += 1
        self.stats.last_poll_unix = time.time()

    def _changed(self, window: str, changes: str, newest: int) -> Sequence[Sequence[Any]]:
        """The rows of `changes` since `newest` less the overlap, or none when the
        window's fingerprint says nothing arrived since the last read."""
        since = _since(newest)
        fingerprint = tuple(self.store.query(window, {"since": since})[0])
        if self._windows.get(window) == (since, fingerprint):
            return []
        rows = self.store.query(changes, {"since": since})
        self._windows[window] = (since, fingerprint)
        return rows


def _since(newest: int) -> int:
    return max(0, newest - OVERLAP_NS)


def _accounts(rows: Sequence[Sequence[Any]]) -> list[AccountChange]:
    return [AccountChange(str(i), str(p), int(a), c, int(v)) for i, p, a, c, v in rows]


def _keys(rows: Sequence[Sequence[Any]]) -> list[KeyChange]:
    return [
        KeyChange(str(p), str(h), str(a), bool(adm), bool(r), int(v)) for p, h, a, adm, r, v in rows
    ]
