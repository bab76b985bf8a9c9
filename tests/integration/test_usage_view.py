"""The usage view answers exactly what the store answers (query_api/view.py).

A real embedded store (a database of the test's own) gets randomized rollups the
sink's way (several INSERTs, so parts stay unmerged): many accounts, requests,
opened and closed streams, minutes over weeks before and after the clocks used,
accounts with no rollups and rollups with no account, freshness markers. The view
is loaded, then for many accounts at several instants `view.usage_reads` must equal
`queries.usage_reads` field for field. More random INSERTs then go both to the store
(`RollupStore.write_json`) and to the view (`apply`, the sink's listener), and the
comparison runs again; keys and revocation likewise.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from query_api import queries
from query_api.accounts import AccountStore
from query_api.usage import history_start, history_start_any_anchor
from query_api.view import UsageView
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import offset_markers
from schemas.store import Store
from tests.rollups import write_wire

TOPIC = "view.events"
HISTORY = timedelta(days=42)
IDLE = timedelta(seconds=900)
AHEAD = timedelta(minutes=6)
BASE = datetime(2026, 3, 14, 15, 9, 26, 535_897, tzinfo=UTC)
# The instants compared: off-minute, on a minute with a fraction, days later.
NOWS = [
    BASE,
    BASE.replace(second=0, microsecond=500_000) + timedelta(minutes=3),
    BASE + timedelta(hours=5, minutes=17, seconds=1, microseconds=999),
    BASE + timedelta(days=2, minutes=1),
    BASE + timedelta(days=9, seconds=33, microseconds=250_001),
]
ACCOUNTS = [f"acct-{i:03d}" for i in range(40)]
NO_ACCOUNT_ROW = ["ghost-1", "ghost-2"]
"""Rollups without an account row: the view must not invent one."""


def _wire_rows(rng: random.Random, count: int) -> list[list[Any]]:
    """Rollup rows in the wire layout, spread where every read looks: weeks back,
    around each instant (streams near the idle cutoff), and ahead of the clock."""
    rows: list[list[Any]] = []
    for _ in range(count):
        account = rng.choice(ACCOUNTS + NO_ACCOUNT_ROW)
        around = rng.choice(NOWS)
        spot = rng.random()
        if spot < 0.3:
            at = around - timedelta(seconds=rng.uniform(0, 50 * 86_400))
        elif spot < 0.9:
            at = around + timedelta(seconds=rng.uniform(-1_500, 400))
        else:
            at = around + timedelta(seconds=rng.uniform(400, 2_000))
        minute = int(at.timestamp()) // 60 * 60
        kind = rng.choice([REQUEST, REQUEST, STREAM_OPENED, STREAM_CLOSED])
        stream_id = "" if kind == REQUEST else f"s{rng.randrange(6)}"
        last_ms = minute * 1000 + rng.randrange(60_000)
        rows.append(
            [
                account,
                minute,
                kind,
                rng.choice(["/v1/chat", "/v1/embed"]),
                rng.choice(["", "POST"]),
                rng.choice(["", "m1"]),
                rng.choice([0, 200, 429]),
                stream_id,
                rng.randrange(1, 5),
                rng.randrange(0, 3_000_000),
                rng.uniform(0, 500),
                rng.randrange(1000),
                rng.randrange(1000),
                last_ms,
            ]
        )
    return rows


def _boundary_rows() -> list[list[Any]]:
    """Rows on every edge a read has, per instant: streams opened a millisecond
    around the idle cutoff, requests in the minutes either side of `since` and `until`."""
    rows: list[list[Any]] = []
    for i, now in enumerate(NOWS):
        account = ACCOUNTS[i]
        cutoff_ms = int((now - IDLE).timestamp() * 1000)
        for d in (-1, 0, 1, 999):
            ms = cutoff_ms + d
            minute = ms // 60_000 * 60
            rows.append(
                [account, minute, STREAM_OPENED, "", "", "", 0, f"b{d}", 1, 0, 0.0, 0, 0, ms]
            )
        since = int(history_start_any_anchor(now, HISTORY).timestamp())
        until = int((now + AHEAD).timestamp())
        for edge in (since, until):
            for minute in (edge // 60 * 60 - 60, edge // 60 * 60, edge // 60 * 60 + 60):
                rows.append(
                    [account, minute, REQUEST, "", "", "", 200, "", 1, 7, 0.0, 0, 0, minute * 1000]
                )
    return rows


def _write(
    store: Store, rng: random.Random, count: int, offsets: dict[int, int]
) -> tuple[list[list[Any]], dict[int, int]]:
    """One sink INSERT: rows plus freshness markers for a few partitions."""
    wire = _wire_rows(rng, count) + (_boundary_rows() if not offsets else [])
    fresh = {
        p: int((rng.choice(NOWS) - timedelta(seconds=rng.uniform(0, 30))).timestamp() * 1000)
        for p in rng.sample(range(4), rng.randrange(1, 4))
    }
    for p in fresh:
        offsets[p] = offsets.get(p, 0) + rng.randrange(1, 100)
    markers = offset_markers(TOPIC, {p: offsets[p] for p in fresh}, fresh)
    # The wire rows the listeners get carry no offset_end; the INSERT's rows do.
    write_wire(store, [[*row, 0] for row in wire] + markers)
    return wire, fresh


def _view(load_now: datetime) -> UsageView:
    return UsageView(TOPIC, HISTORY, IDLE, max_rows=1_000_000, now=lambda: load_now)


def _assert_same(view: UsageView, store: Store) -> int:
    """Every account at every instant; the number of non-trivial answers compared."""
    interesting = 0
    for now in NOWS:
        since = history_start_any_anchor(now, HISTORY)
        cutoff = now - IDLE
        assert view.covers(since, cutoff)
        for account in [*ACCOUNTS, *NO_ACCOUNT_ROW, "nobody"]:
            want = queries.usage_reads(store, account, since, now + AHEAD, cutoff, TOPIC)
            got = view.usage_reads(account, since, now + AHEAD, cutoff)
            assert got == want, (account, now)
            interesting += bool(want.minutes) + bool(want.active_streams)
            # /api/account/usage reads from the account's own history start.
            for anchor in (1, 17, 31):
                start = history_start(now, HISTORY, anchor)
                assert view.minutes(account, start, now + AHEAD) == queries.account_minutes(
                    store, account, start, now + AHEAD
                ), (account, now, anchor)
    return interesting


def test_view_equals_the_store_after_load_and_after_applied_writes(store: Store) -> None:
    rng = random.Random(5)
    directory = AccountStore(store)
    for account in ACCOUNTS:
        directory.create(account, rng.choice(["free", "pro", "max"]), rng.randrange(1, 32))
    offsets: dict[int, int] = {}
    for _ in range(4):
        _write(store, rng, 1_500, offsets)

    view = _view(min(NOWS))
    view.load(store)
    assert view.active
    interesting = _assert_same(view, store)
    streams = sum(queries.active_streams(store, a, now - IDLE) for a in ACCOUNTS for now in NOWS)
    # The data must exercise every branch.
    assert interesting > 200
    assert streams > 20
    assert view.reflected_until() is not None

    for _ in range(5):
        wire, fresh = _write(store, rng, 400, offsets)
        view.apply(wire, fresh)
    _assert_same(view, store)


def test_view_before_any_marker_has_no_freshness(store: Store) -> None:
    view = _view(BASE)
    view.load(store)
    assert view.usage_reads("x", BASE, BASE, BASE) == queries.usage_reads(
        store, "x", BASE, BASE, BASE, TOPIC
    )
    assert view.reflected_until() is None


def test_admin_writes_keep_accounts_and_keys_exact(store: Store) -> None:
    view = _view(BASE)
    view.load(store)
    directory = AccountStore(store, view)  # what the app's admin routes use
    plain = AccountStore(store)
    directory.create("acme", "pro", 9)
    since = history_start_any_anchor(BASE, HISTORY)

    def reads() -> tuple[queries.UsageReads, queries.UsageReads]:
        return (
            view.usage_reads("acme", since, BASE, BASE - IDLE),
            queries.usage_reads(store, "acme", since, BASE, BASE - IDLE, TOPIC),
        )

    got, want = reads()
    assert got == want
    assert got.account is not None
    assert got.account[0] == "pro"
    directory.set_plan("acme", "max")
    got, want = reads()
    assert got == want
    assert got.account is not None
    assert got.account[0] == "max"

    key, info = directory.create_key("acme", admin=False)
    admin_key, _ = directory.create_key(None, admin=True)
    for presented in (key, admin_key, key[:-1] + ("A" if key[-1] != "A" else "B"), "nope", ""):
        assert view.authenticate(presented) == plain.authenticate(presented), presented
    assert view.authenticate(key) is not None
    assert directory.revoke_key(info.prefix)
    assert view.authenticate(key) is None
    assert plain.authenticate(key) is None
    assert view.authenticate(admin_key) == plain.authenticate(admin_key)

    # A fresh load reads the same keys and accounts back.
    again = _view(BASE)
    again.load(store)
    for presented in (key, admin_key):
        assert again.authenticate(presented) == view.authenticate(presented)
    assert again.account("acme") == view.account("acme")


def test_a_write_reported_before_the_load_is_not_lost(store: Store) -> None:
    view = _view(BASE)
    directory = AccountStore(store, view)
    directory.create("early", "free")  # the view is not loaded yet: it must read this
    view.load(store)
    found = AccountStore(store).get("early")
    assert found is not None
    assert view.account("early") == (found.plan, found.billing_anchor_day, found.created_at)


def _assert_same_or_evicted(view: UsageView, store: Store) -> None:
    for now in NOWS:
        since, cutoff = history_start_any_anchor(now, HISTORY), now - IDLE
        for account in [*ACCOUNTS, *NO_ACCOUNT_ROW]:
            got = view.usage_reads(account, since, now + AHEAD, cutoff)
            if account in view.evicted:
                assert got is None, account  # the API reads the store for it
                continue
            want = queries.usage_reads(store, account, since, now + AHEAD, cutoff, TOPIC)
            assert got == want, (account, now)


def test_over_max_rows_the_view_evicts_accounts_and_the_rest_stay_exact(store: Store) -> None:
    rng = random.Random(7)
    offsets: dict[int, int] = {}
    for _ in range(2):
        _write(store, rng, 1_000, offsets)
    whole = _view(min(NOWS))
    whole.load(store)
    bound = whole.rows // 2
    view = UsageView(TOPIC, HISTORY, IDLE, max_rows=bound, now=lambda: min(NOWS))
    view.load(store)
    assert view.active
    assert view.evicted
    assert view.rows <= bound
    assert len(view.evicted) < len(ACCOUNTS)
    _assert_same_or_evicted(view, store)
    for _ in range(3):
        wire, fresh = _write(store, rng, 400, offsets)
        view.apply(wire, fresh)
    assert view.rows <= bound
    _assert_same_or_evicted(view, store)


def test_pruning_as_time_passes_keeps_answers_exact(store: Store) -> None:
    rng = random.Random(11)
    offsets: dict[int, int] = {}
    for _ in range(3):
        _write(store, rng, 1_000, offsets)
    clock = [min(NOWS)]
    view = UsageView(TOPIC, HISTORY, IDLE, max_rows=1_000_000, now=lambda: clock[0])
    view.load(store)
    held = view.rows
    clock[0] = max(NOWS)
    wire, fresh = _write(store, rng, 50, offsets)
    view.apply(wire, fresh)  # the first apply prunes what the new clock no longer reads
    assert view.rows < held + 50
    now = max(NOWS)
    since = history_start_any_anchor(now, HISTORY)
    assert view.covers(since, now - IDLE)
    assert not view.covers(history_start_any_anchor(min(NOWS), HISTORY), min(NOWS) - IDLE)
    for account in [*ACCOUNTS, *NO_ACCOUNT_ROW]:
        assert view.usage_reads(account, since, now + AHEAD, now - IDLE) == queries.usage_reads(
            store, account, since, now + AHEAD, now - IDLE, TOPIC
        ), account
