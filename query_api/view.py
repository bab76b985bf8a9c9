"""The usage view: what /api/.../account/usage reads, held in memory.

A statement costs milliseconds (the embedded store also serialises them
process-wide), so reading the store per request caps the usage endpoints far
below what the web stack serves (benchmarks/api.py). Every `tally api` process,
on any store, therefore answers usage from this view:

- `load(store)` reads a snapshot: accounts, keys, the rollups the answers need
  and, in the SAME statement as the rollups, the offset markers that say which
  `tally.rollups` messages those rollups contain (one SELECT sees one set of
  parts; each sink INSERT is one part holding its deltas and its markers, so the
  rollups read and the markers read agree exactly);
- `query_api.view_feed` then applies every committed delta after those markers,
  read from `tally.rollups` by the rules the sink applies them by (`FeedPosition`),
  and polls accounts and keys (`sync_accounts`, `sync_keys`).

One way for every deployment: `tally up` on the embedded store feeds its view from
the topic too (not from its own sink's INSERTs), so the path replicas depend on is
the one every test and install runs. Fed by the topic, a view can be ahead of the
store (a delta committed, not yet INSERTed), never wrong: the sink applies the same
deltas once, in order; `meta.updated_at` / `X-Data-Delay` say what the view holds.

Admin writes made through this process reach the view at once
(`AccountsListener`); those of other processes within one poll. Versions
(ReplacingMergeTree's) decide which write wins, so a poll answer that raced a
local write never undoes it.

Pure apart from `load(store)`. Thread-safe: admin writes arrive from worker
threads, deltas and polls on the event loop, reads on the event loop.
"""

from __future__ import annotations

import logging
import threading
from array import array
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from query_api.accounts import Principal
from query_api.keys import prefix_of, same_key
from query_api.queries import MinuteRow, UsageReads
from query_api.view_rows import AccountChange, Horizon, KeyChange, Snapshot, Versions
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import MARKER_PARAMS, MARKER_WHERE, POSITION, Marker
from schemas.store import Store
from schemas.windows import EPOCH

# Where apply() reads a wire row: positions from the table's one column spec.
_ACCOUNT, _MINUTE, _TYPE, _STREAM, _EVENTS, _UNITS, _LAST_TIME = (
    POSITION[name]
    for name in ("account", "minute", "type", "stream_id", "events", "units_micro", "last_time")
)

log = logging.getLogger("tally.api.view")

PAGE_ROWS = 100_000
"""Rows per statement while loading: memory stays bounded by the data held."""
EVICT_TO = 0.9
"""Past its bound the view evicts down to this share of it, so evictions are rare."""
PRUNE_EVERY_S = 600
"""How often (by the view's clock) apply() drops minutes that no answer reads any more."""

SNAPSHOT_MINUTE = (
    "SELECT account, minute, stream_id, if(type = {marker_type:String}, route, '') AS topic,"
    " if(type = {marker_type:String}, status, 0) AS partition,"
    " sumIf(events, type = {req:String}),"
    " sumIf(units_micro, type IN ({req:String}, {closed:String})),"
    " countIf(type = {opened:String}), maxIf(last_time, type = {opened:String}),"
    " countIf(type = {closed:String}), max(offset_end), max(last_time) "
    "FROM rollup_minute "
    "WHERE (minute >= {since:DateTime} AND type != {marker_type:String})"
    f" OR ({MARKER_WHERE} AND route IN ({{events:String}}, {{rollups:String}})) "
    "GROUP BY account, minute, stream_id, topic, partition"
)
"""The rollups and the markers they reflect, in ONE statement (see the module
docstring): per (account, minute, stream_id) the usage sums and stream folds, and
per (topic, partition) marker its offset and time."""

AccountRow = tuple[str, int, datetime]
"""(plan, billing_anchor_day, created_at), as `queries.UsageReads.account`."""


def ms_time(ms: int) -> datetime:
    """The DateTime64(3) value `ms` as the store returns it."""
    return EPOCH + timedelta(milliseconds=ms)


def to_ms(at: datetime) -> int:
    """A time as the store keeps it in DateTime64(3): whole milliseconds, truncated."""
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def minute_of(at: datetime) -> int:
    """Epoch seconds of the minute `at` is in."""
    return to_ms(at) // 60_000 * 60


class _Usage:
    """One account's per-minute sums (parallel arrays sorted by minute) and its
    stream rows: per stream_id, per minute, [max opened last_time ms (-1: none),
    closed rows]. Arrays, not tuples: 100k accounts x a week of minutes must fit."""

    __slots__ = ("minutes", "requests", "streams", "units")

    def __init__(self) -> None:
        self.minutes = array("q")
        self.requests = array("q")
        self.units = array("q")
        self.streams: dict[str, dict[int, list[int]]] = {}

    def add(self, minute: int, requests: int, units: int) -> bool:
        """Add to a minute; True when the minute is new."""
        minutes = self.minutes
        if not minutes or minutes[-1] < minute:  # the usual case: the latest minute
            minutes.append(minute)
            self.requests.append(requests)
            self.units.append(units)
            return True
        at = bisect_left(minutes, minute)
        if at < len(minutes) and minutes[at] == minute:
            self.requests[at] += requests
            self.units[at] += units
            return False
        minutes.insert(at, minute)
        self.requests.insert(at, requests)
        self.units.insert(at, units)
        return True

    def add_stream(self, stream_id: str, minute: int, opened_ms: int, closes: int) -> bool:
        """Fold a stream row in; True when (stream, minute) is new."""
        by_minute = self.streams.get(stream_id)
        if by_minute is None:
            by_minute = self.streams[stream_id] = {}
        found = by_minute.get(minute)
        if found is None:
            by_minute[minute] = [opened_ms, closes]
            return True
        if opened_ms > found[0]:
            found[0] = opened_ms
        found[1] += closes
        return False

    def prune(self, before: int, streams_before: int) -> int:
        """Drop minutes before `before` and stream minutes before `streams_before`;
        the number of entries dropped."""
        dropped = 0
        cut = bisect_left(self.minutes, before)
        if cut:
            del self.minutes[:cut]
            del self.requests[:cut]
            del self.units[:cut]
            dropped += cut
        for stream_id in list(self.streams):
            by_minute = self.streams[stream_id]
            old = [m for m in by_minute if m < streams_before]
            for minute in old:
                del by_minute[minute]
            dropped += len(old)
            if not by_minute:
                del self.streams[stream_id]
        return dropped

    def size(self) -> int:
        """The rows this account counts for in `UsageView.rows`."""
        return len(self.minutes) + sum(len(by_minute) for by_minute in self.streams.values())

    def empty(self) -> bool:
        return not self.minutes and not self.streams


def horizon_at(now: datetime, history: timedelta, idle: timedelta) -> Horizon:
    # Imported here: query_api.usage imports queries, which this module also does.
    from query_api.usage import history_start_any_anchor

    return Horizon(
        minutes=minute_of(history_start_any_anchor(now, history)),
        streams=minute_of(now - idle),
    )


class UsageView:
    """Accounts, live keys, per-minute usage, stream rows and freshness markers of
    one store, kept exact by `apply` (the sink) and the `put_*`/`drop_key` calls
    (admin writes), each made right after the store write succeeded."""

    def __init__(
        self,
        events_topic: str,
        history: timedelta,
        idle: timedelta,
        max_rows: int,
        now: Callable[[], datetime],
        rollups_topic: str = "tally.rollups",
    ) -> None:
        self.events_topic = events_topic
        self.rollups_topic = rollups_topic
        self.history = history
        self.idle = idle
        self.max_rows = max_rows
        self.now = now
        self.loaded = False
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._stale = False
        self._reset(horizon_at(now(), history, idle))

    def _reset(self, horizon: Horizon) -> None:
        self.horizon = horizon
        self.rows = 0
        self._accounts: dict[str, AccountRow] = {}
        self._keys: dict[str, tuple[str, str, bool]] = {}
        self._usage: dict[str, _Usage] = {}
        self._reflected: dict[int, int] = {}
        self._marks: Mapping[int, datetime] | None = None  # _partition_marks's cache
        self._times: dict[int, datetime] = {}
        self._next_prune = horizon.minutes
        self.evicted: set[str] = set()
        """Accounts dropped to stay within TALLY_API_VIEW_MAX_ROWS: their usage is read
        from the store (`usage_reads` answers None for them) until the next load."""
        self.versions = Versions()
        self.snapshot = Snapshot({}, {})

    @property
    def active(self) -> bool:
        return self.loaded

    # -- loading ---------------------------------------------------------------------

    def ensure_loaded(self, store: Store) -> None:
        """Load unless loaded (or being loaded: then wait for it)."""
        with self._loading:
            if not self.loaded:
                self.load(store)

    def load(self, store: Store) -> None:
        """Read everything the view holds from the store (a few bulk statements).

        A write reported while loading may or may not be in what was read, so the
        load starts over then: no write is missed or counted twice.
        """
        import time

        started = time.perf_counter()
        while True:
            with self._lock:
                self._stale = False
                self.loaded = False
            horizon = horizon_at(self.now(), self.history, self.idle)
            built = UsageView(
                self.events_topic,
                self.history,
                self.idle,
                self.max_rows,
                self.now,
                self.rollups_topic,
            )
            built._reset(horizon)
            built._read(store)
            with self._lock:
                if self._stale:
                    continue
                self.horizon = built.horizon
                self.rows = built.rows
                self._accounts, self._keys = built._accounts, built._keys
                self._usage, self._reflected, self._marks = built._usage, built._reflected, None
                self._times, self._next_prune = built._times, built._next_prune
                self.versions, self.snapshot = built.versions, built.snapshot
                self.evicted = built.evicted
                self.loaded = True
                break
        self.load_seconds = time.perf_counter() - started
        log.info(
            "usage view: %d accounts, %d keys, %d rows loaded in %.2fs (%d accounts read "
            "from the store)",
            len(self._accounts),
            len(self._keys),
            self.rows,
            self.load_seconds,
            len(self.evicted),
        )

    def _read(self, store: Store) -> None:
        """Fill this (private, fresh) view from the store."""
        after = ""
        while True:
            page = store.query(
                "SELECT id, plan, billing_anchor_day, created_at, version FROM accounts FINAL "
                "WHERE id > {after:String} ORDER BY id LIMIT {n:UInt32}",
                {"after": after, "n": PAGE_ROWS},
            )
            for account_id, plan, anchor, created, version in page:
                self._accounts[account_id] = (str(plan), int(anchor), created)
                self.versions.take_account(account_id, int(version))
            if len(page) < PAGE_ROWS:
                break
            after = page[-1][0]
        for prefix, key_hash, account, is_admin, revoked, version in store.query(
            "SELECT prefix, key_hash, account, is_admin, revoked_at IS NOT NULL, version "
            "FROM api_keys FINAL"
        ):
            # Revoked keys keep their version: an older row of theirs seen later
            # (a poll) must not bring them back.
            self.versions.take_key(prefix, int(version))
            if not revoked:
                self._keys[prefix] = (key_hash, account, bool(is_admin))
        self._read_rollups(store)

    def _read_rollups(self, store: Store) -> None:
        """The rollups and their markers in one statement (SNAPSHOT_MINUTE), streamed."""

        def fold(block: Sequence[Sequence[Any]]) -> bool:
            self._fold_snapshot(block)
            return True

        store.query_blocks(
            SNAPSHOT_MINUTE,
            {
                "since": ms_time(self.horizon.minutes * 1000),
                **MARKER_PARAMS,
                "events": self.events_topic,
                "rollups": self.rollups_topic,
                "req": REQUEST,
                "opened": STREAM_OPENED,
                "closed": STREAM_CLOSED,
            },
            fold,
        )

    def _fold_snapshot(self, rows: Sequence[Sequence[Any]]) -> None:
        """Fold a block of SNAPSHOT_MINUTE, within TALLY_API_VIEW_MAX_ROWS."""
        streams_since = self.horizon.streams
        for account, at, stream_id, topic, partition, requests, units, *rest in rows:
            opens, opened_at, closes, offset_end, last = rest
            if topic:
                self._marker(Marker(str(topic), int(partition), int(offset_end), last))
                continue
            minute = minute_of(at)
            self._add(account, minute, int(requests), int(units))
            if stream_id and (opens or closes) and minute >= streams_since:
                opened_ms = to_ms(opened_at) if opens else -1
                self._add_stream(account, stream_id, minute, opened_ms, int(closes))
        if self.rows > self.max_rows:
            self._evict()

    def _marker(self, marker: Marker) -> None:
        if marker.topic == self.events_topic:
            self._reflected[marker.partition] = to_ms(marker.last_time)
            self.snapshot.counted[marker.partition] = marker.offset_end
        if marker.topic == self.rollups_topic:
            self.snapshot.rollups[marker.partition] = marker.offset_end

    # -- writes ----------------------------------------------------------------------

    def _add(self, account: str, minute: int, requests: int, units: int) -> None:
        usage = self._usage.get(account)
        if usage is None:
            if account in self.evicted:
                return
            usage = self._usage[account] = _Usage()
        if usage.add(minute, requests, units):
            self.rows += 1

    def _add_stream(
        self, account: str, stream_id: str, minute: int, opened_ms: int, closes: int
    ) -> None:
        usage = self._usage.get(account)
        if usage is None:
            if account in self.evicted:
                return
            usage = self._usage[account] = _Usage()
        if usage.add_stream(stream_id, minute, opened_ms, closes):
            self.rows += 1

    def _writable(self) -> bool:
        """Under the lock: whether a write may be applied now. While not loaded, a
        write marks a running load stale (it starts over and reads the write)."""
        if not self.loaded:
            self._stale = True
            return False
        return True

    def apply(self, rows: Sequence[Sequence[Any]], reflected_ms: Mapping[int, int]) -> None:
        """One `tally.rollups` record as `view_feed.FeedPosition` folds it: its delta's
        wire rows (schemas/deltas.py) and, per events partition, the time (epoch
        ms) the view now reflects it up to."""
        with self._lock:
            if not self._writable():
                return
            horizon = self.horizon
            for row in rows:
                account, minute, kind = row[_ACCOUNT], row[_MINUTE], row[_TYPE]
                if kind == REQUEST:
                    requests, units = row[_EVENTS], row[_UNITS]
                elif kind == STREAM_CLOSED:
                    requests, units = 0, row[_UNITS]
                else:
                    requests, units = 0, 0
                if minute >= horizon.minutes:
                    self._add(account, minute, requests, units)
                if minute >= horizon.streams and kind in (STREAM_OPENED, STREAM_CLOSED):
                    opened = kind == STREAM_OPENED
                    last = row[_LAST_TIME] if opened else -1
                    self._add_stream(account, row[_STREAM], minute, last, 0 if opened else 1)
            for partition, ms in reflected_ms.items():
                if ms > self._reflected.get(partition, -1):
                    self._reflected[partition] = ms
                    self._marks = None
            if self.rows > self.max_rows:
                self._evict()
            now_s = to_ms(self.now()) // 1000
            if now_s >= self._next_prune:
                self._prune()
                self._next_prune = now_s + PRUNE_EVERY_S

    def _evict(self) -> None:
        """Over TALLY_API_VIEW_MAX_ROWS: drop the accounts holding the most rows until
        the view holds EVICT_TO of the bound. Their usage is read from the store from
        then on (exact, slower); every other account, and every key, stays in memory.
        The biggest first: the fewest accounts leave the memory path per row freed."""
        target = int(self.max_rows * EVICT_TO)
        dropped = 0
        for account, usage in sorted(self._usage.items(), key=lambda item: -item[1].size()):
            if self.rows <= target:
                break
            self.rows -= usage.size()
            del self._usage[account]
            self.evicted.add(account)
            dropped += 1
        log.warning(
            "usage view: more than TALLY_API_VIEW_MAX_ROWS=%d rows; the %d accounts holding "
            "the most (%d in all now) are read from the store per request (slower). Raise the "
            "setting to serve them from memory.",
            self.max_rows,
            dropped,
            len(self.evicted),
        )

    def _prune(self) -> None:
        """Drop what no answer from now on reads (the horizon only moves forward)."""
        horizon = horizon_at(self.now(), self.history, self.idle)
        if horizon.minutes <= self.horizon.minutes and horizon.streams <= self.horizon.streams:
            return
        horizon = Horizon(
            max(horizon.minutes, self.horizon.minutes), max(horizon.streams, self.horizon.streams)
        )
        self.horizon = horizon
        for account in list(self._usage):
            usage = self._usage[account]
            self.rows -= usage.prune(horizon.minutes, horizon.streams)
            if usage.empty():
                del self._usage[account]
        self._times = {m: t for m, t in self._times.items() if m >= horizon.minutes}

    def prune(self) -> None:
        with self._lock:
            if self.active:
                self._prune()

    def put_account(
        self, account_id: str, plan: str, anchor_day: int, created: datetime, version: int
    ) -> None:
        """An account row was written (created, or its plan changed)."""
        with self._lock:
            if self._writable():
                self._put_account(AccountChange(account_id, plan, anchor_day, created, version))

    def put_key(
        self, prefix: str, key_hash: str, account: str | None, admin: bool, version: int
    ) -> None:
        with self._lock:
            if self._writable():
                self._put_key(KeyChange(prefix, key_hash, account or "", admin, False, version))

    def drop_key(self, prefix: str, version: int) -> None:
        with self._lock:
            if self._writable() and self.versions.take_key(prefix, version):
                self._keys.pop(prefix, None)

    def sync_accounts(self, changes: Sequence[AccountChange]) -> None:
        """Rows other processes wrote (query_api/view_feed.py polls them)."""
        with self._lock:
            if self._writable():
                for change in changes:
                    self._put_account(change)

    def sync_keys(self, changes: Sequence[KeyChange]) -> None:
        with self._lock:
            if self._writable():
                for change in changes:
                    self._put_key(change)

    def _put_account(self, change: AccountChange) -> None:
        if not self.versions.take_account(change.id, change.version):
            return  # what the view holds is as new or newer
        created = ms_time(to_ms(change.created))
        self._accounts[change.id] = (change.plan, change.anchor_day, created)

    def _put_key(self, change: KeyChange) -> None:
        if not self.versions.take_key(change.prefix, change.version):
            return
        if change.revoked:
            self._keys.pop(change.prefix, None)
        else:
            self._keys[change.prefix] = (change.key_hash, change.account, change.admin)

    # -- reads -----------------------------------------------------------------------

    def covers(self, since: datetime, idle_cutoff: datetime) -> bool:
        """Whether the view holds everything a read from `since` (streams from
        `idle_cutoff`) needs: answers for an earlier `since` need the store."""
        horizon = self.horizon
        return (
            self.active
            and minute_of(since) >= horizon.minutes
            and minute_of(idle_cutoff) >= horizon.streams
        )

    def authenticate(self, key: str) -> Principal | None:
        """As `AccountStore.authenticate`."""
        prefix = prefix_of(key)
        if prefix is None:
            return None
        found = self._keys.get(prefix)
        if found is None or not same_key(key, found[0]):
            return None
        _, account, admin = found
        return Principal(account or None, admin, prefix)

    def account(self, account_id: str) -> AccountRow | None:
        return self._accounts.get(account_id)

    def _time(self, minute: int) -> datetime:
        at = self._times.get(minute)
        if at is None:
            at = self._times[minute] = ms_time(minute * 1000)
        return at

    def minutes(self, account: str, since: datetime, until: datetime) -> list[MinuteRow]:
        """As `queries.account_minutes`."""
        usage = self._usage.get(account)
        if usage is None:
            return []
        # The bounds compare as the store compares DateTime parameters: whole seconds.
        low, high = to_ms(since) // 1000, to_ms(until) // 1000
        minutes = usage.minutes
        start, end = bisect_left(minutes, low), bisect_left(minutes, high)
        time = self._time
        requests, units = usage.requests, usage.units
        return [(time(minutes[i]), requests[i], units[i]) for i in range(start, end)]

    def active_streams(self, account: str, idle_cutoff: datetime) -> int:
        """As `queries.active_streams`."""
        usage = self._usage.get(account)
        if usage is None or not usage.streams:
            return 0
        since = minute_of(idle_cutoff)
        cutoff = to_ms(idle_cutoff)
        active = 0
        for by_minute in usage.streams.values():
            opened, closes = -1, 0
            for minute, (opened_ms, closed) in by_minute.items():
                if minute >= since:
                    opened = max(opened, opened_ms)
                    closes += closed
            # A stream without an opened row has opened_at = the epoch in the store.
            if closes == 0 and max(opened, 0) > cutoff:
                active += 1
        return active

    def reflected_until(self) -> datetime | None:
        """As `queries.reflected_until`."""
        marks = self._partition_marks()
        return min(marks.values()) if marks else None

    def _partition_marks(self) -> Mapping[int, datetime]:
        """Per events partition, its events' counted-to time (rebuilt, never mutated)."""
        if self._marks is None:
            self._marks = {p: ms_time(ms) for p, ms in sorted(self._reflected.items())}
        return self._marks

    def usage_reads(
        self, account: str, since: datetime, until: datetime, idle_cutoff: datetime
    ) -> UsageReads | None:
        """As `queries.usage_reads` for the store the view was loaded from; None for an
        account the view does not hold (`evicted`): read the store for it."""
        with self._lock:
            if account in self.evicted:
                return None
            return UsageReads(
                account=self._accounts.get(account),
                minutes=self.minutes(account, since, until),
                active_streams=self.active_streams(account, idle_cutoff),
                reflected_until=self.reflected_until(),
                partitions=self._partition_marks(),
            )
