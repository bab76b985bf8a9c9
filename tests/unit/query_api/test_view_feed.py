"""The usage view's feed decides each `tally.rollups` record as the sink applies it
(query_api/view_feed.py, FeedPosition): nothing the snapshot holds is applied again,
a delta for events counted already adds nothing, a split delta counts once it is
whole. With a real Kafka and store: tests/integration/test_api_replicas.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from query_api.keys import hash_key, new_key
from query_api.view import UsageView, to_ms
from query_api.view_feed import (
    ACCOUNT_CHANGES,
    ACCOUNT_WINDOW,
    KEY_CHANGES,
    OVERLAP_NS,
    FeedPosition,
    ViewFeed,
)
from query_api.view_rows import Snapshot
from schemas.deltas import encode_wire
from schemas.events import REQUEST

NOW = datetime(2026, 3, 14, 15, 9, 26, 535_897, tzinfo=UTC)
MINUTE = int(NOW.timestamp()) // 60 * 60


def row(account: str, events: int, units: int = 0, minute: int = MINUTE) -> list[Any]:
    return [account, minute, REQUEST, "", "", "", 200, "", events, units, 0.0, 0, 0, 0, 0]


def message(partition: int, next_offset: int, rows: list[list[Any]], ms: int = 1_000) -> bytes:
    [value] = encode_wire(partition, next_offset, ms, rows)
    return value


def test_records_the_snapshot_holds_are_never_applied_again() -> None:
    position = FeedPosition(Snapshot(rollups={0: 5}, counted={0: 100}))
    assert position.fold(0, 3, message(0, 90, [row("a", 1)])) is None
    assert position.fold(0, 4, message(0, 100, [row("a", 1)])) is None
    fold = position.fold(0, 5, message(0, 110, [row("a", 2)], ms=7_000))
    assert fold is not None
    assert [r[0] for r in fold.rows] == ["a"]
    assert fold.fresh == {0: 7_000}
    assert position.next == {0: 6}
    assert position.counted == {0: 110}
    # Fetched again after a reconnect: held already.
    assert position.fold(0, 5, message(0, 110, [row("a", 2)])) is None


def test_a_partition_the_snapshot_has_no_marker_for_starts_at_its_beginning() -> None:
    position = FeedPosition(Snapshot(rollups={}, counted={}))
    fold = position.fold(1, 0, message(1, 10, [row("b", 1)]))
    assert fold is not None
    assert len(fold.rows) == 1
    assert position.next == {1: 1}
    assert position.counted == {1: 10}


def test_a_delta_for_events_counted_already_adds_nothing_but_freshness() -> None:
    """The sink's guard against a batch committed twice upstream: the same rows skipped."""
    position = FeedPosition(Snapshot(rollups={0: 0}, counted={2: 50}))
    fold = position.fold(0, 0, message(2, 50, [row("a", 9)], ms=4_000))
    assert fold is not None
    assert fold.rows == []
    assert fold.fresh == {2: 4_000}
    assert position.duplicates == 1
    heartbeat = position.fold(0, 1, message(2, 50, [], ms=5_000))
    assert heartbeat is not None
    assert heartbeat.rows == []
    assert heartbeat.fresh == {2: 5_000}
    assert position.duplicates == 1  # a heartbeat carries no rows: no duplicate


def test_a_split_delta_is_counted_once_its_final_message_is_applied() -> None:
    rows = [row(f"acct-{i}", 1) for i in range(400)]
    chunks = encode_wire(0, 40, 9_000, rows, max_bytes=4_000)
    assert len(chunks) > 2
    position = FeedPosition(Snapshot(rollups={}, counted={}))
    applied: list[list[Any]] = []
    for offset, chunk in enumerate(chunks):
        fold = position.fold(0, offset, chunk)
        assert fold is not None
        applied.extend(fold.rows)
        last = offset == len(chunks) - 1
        assert fold.fresh == ({0: 9_000} if last else {})
        assert position.counted == ({0: 40} if last else {})
    assert len(applied) == 400
    # The same delta committed again later: its events are counted, nothing is added.
    again = [position.fold(0, len(chunks) + i, c) for i, c in enumerate(chunks)]
    assert all(fold is not None and fold.rows == [] for fold in again)


def _view() -> UsageView:
    view = UsageView("e", timedelta(days=42), timedelta(seconds=900), 10_000, now=lambda: NOW)
    view.loaded = True  # an empty store: nothing to read
    return view


def _totals(view: UsageView) -> dict[str, tuple[int, int]]:
    until = NOW + timedelta(hours=1)
    out = {}
    for account in ("a", "b", "c"):
        rows = view.minutes(account, NOW - timedelta(days=1), until)
        out[account] = (sum(r[1] for r in rows), sum(r[2] for r in rows))
    return out


def test_snapshot_then_feed_equals_every_record_applied_once() -> None:
    """Cut the topic anywhere: what the store held at the cut plus the records after
    its markers, folded by FeedPosition, is what applying each record once gives."""
    rng = random.Random(7)
    records: list[tuple[int, int, bytes]] = []  # (rollups partition, offset, value)
    next_offset = {0: 0, 1: 0}
    offsets = {0: 0, 1: 0}
    for _ in range(60):
        p = rng.choice((0, 1))
        next_offset[p] += rng.randint(1, 5)
        rows = [row(rng.choice("abc"), rng.randint(1, 9), rng.randint(0, 99)) for _ in range(3)]
        value = message(p, next_offset[p], rows, ms=to_ms(NOW) + next_offset[p])
        records.append((p, offsets[p], value))
        offsets[p] += 1
        if rng.random() < 0.2:  # a batch committed twice upstream
            records.append((p, offsets[p], value))
            offsets[p] += 1
    everything = _view()
    whole = FeedPosition(Snapshot({}, {}))
    for p, offset, value in records:
        fold = whole.fold(p, offset, value)
        assert fold is not None
        everything.apply(fold.rows, fold.fresh)
    for cut in (0, 1, 17, 40, len(records)):
        stored = _view()  # what the sink had INSERTed at the cut, markers included
        sink = FeedPosition(Snapshot({}, {}))
        for p, offset, value in records[:cut]:
            fold = sink.fold(p, offset, value)
            assert fold is not None
            stored.apply(fold.rows, fold.fresh)
        position = FeedPosition(Snapshot(dict(sink.next), dict(sink.counted)))
        # The feed re-reads from before the markers too (a seek is only where it starts).
        for p, offset, value in records:
            fold = position.fold(p, offset, value)
            if fold is not None:
                stored.apply(fold.rows, fold.fresh)
        assert _totals(stored) == _totals(everything), cut
        assert stored.reflected_until() == everything.reflected_until()
    assert whole.duplicates > 0


class PollStore:
    """Answers the feed's poll statements with the rows given; records each row read's
    `since`. A window's fingerprint is the rows' count and their hash, as the server's."""

    def __init__(self, accounts: list[tuple[Any, ...]], keys: list[tuple[Any, ...]]) -> None:
        self.accounts, self.keys = accounts, keys
        self.asked: list[tuple[str, int]] = []

    def query(self, sql: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        table = "accounts" if sql in (ACCOUNT_CHANGES, ACCOUNT_WINDOW) else "keys"
        rows = self.accounts if table == "accounts" else self.keys
        if sql not in (ACCOUNT_CHANGES, KEY_CHANGES):
            return [(len(rows), hash(tuple(rows)))]
        self.asked.append((table, parameters["since"]))
        return rows


def test_a_poll_applies_changed_rows_and_re_reads_the_overlap() -> None:
    view = _view()
    key, prefix = new_key()
    version = 10 * OVERLAP_NS
    store = PollStore(
        accounts=[("acme", "pro", 1, NOW, version)],
        keys=[(prefix, hash_key(key), "acme", False, False, version + 5)],
    )
    feed = ViewFeed(view, store, "127.0.0.1:9", "r")  # type: ignore[arg-type]
    feed.poll_once()
    assert store.asked == [("accounts", 0), ("keys", 0)]  # nothing held yet: everything
    assert view.account("acme") is not None
    assert view.authenticate(key) is not None
    # Revoked elsewhere: the next poll reads from the newest version held, less the overlap.
    store.accounts = []
    store.keys = [(prefix, hash_key(key), "acme", False, True, version + 9)]
    feed.poll_once()
    assert store.asked[2:] == [
        ("accounts", version - OVERLAP_NS),
        ("keys", version + 5 - OVERLAP_NS),
    ]
    assert view.authenticate(key) is None
    # The creation row re-read within the overlap does not bring the key back.
    store.keys = [(prefix, hash_key(key), "acme", False, False, version + 5)]
    feed.poll_once()
    assert view.authenticate(key) is None


def test_a_poll_reads_rows_again_only_when_its_window_changed() -> None:
    """After a bulk load the window holds every new account for the overlap's length:
    unchanged, it is not read again; one more row in it, and it is."""
    view = _view()
    version = 10 * OVERLAP_NS
    loaded = [(f"a{n}", "pro", 1, NOW, version + n) for n in range(1000)]
    store = PollStore(accounts=list(loaded), keys=[])
    feed = ViewFeed(view, store, "127.0.0.1:9", "r")  # type: ignore[arg-type]
    feed.poll_once()
    feed.poll_once()
    feed.poll_once()
    assert [table for table, _ in store.asked] == ["accounts", "keys", "accounts"]
    # A row that becomes visible late, inside the window: the next poll reads it.
    store.accounts.append(("late", "pro", 1, NOW, version + 500))
    feed.poll_once()
    assert store.asked[-1] == ("accounts", version + 999 - OVERLAP_NS)
    assert view.account("late") is not None
