"""The usage view's pure parts: time arithmetic, folding sink rows, streams,
keys, pruning and stepping aside (query_api/view.py). Equivalence with the store
is tests/integration/test_usage_view.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from query_api.accounts import Principal
from query_api.keys import hash_key, new_key
from query_api.usage import history_start_any_anchor
from query_api.view import UsageView, _Usage, minute_of, ms_time, to_ms
from query_api.view_rows import AccountChange, KeyChange
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED

NOW = datetime(2026, 3, 14, 15, 9, 26, 535_897, tzinfo=UTC)
IDLE = timedelta(seconds=900)
HISTORY = timedelta(days=42)


class EmptyStore:
    """A store with nothing in it (the view reads it once, at load)."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return []

    def query_blocks(self, sql: str, parameters: dict[str, Any], each: Any) -> None:
        return None


def loaded(now: datetime = NOW, max_rows: int = 1_000) -> UsageView:
    view = UsageView("events", HISTORY, IDLE, max_rows, now=lambda: now)
    view.load(EmptyStore())  # type: ignore[arg-type]
    return view


def wire(
    account: str, at: datetime, kind: str = REQUEST, events: int = 1, units: int = 0, sid: str = ""
) -> list[Any]:
    minute = int(at.timestamp()) // 60 * 60
    return [account, minute, kind, "", "", "", 0, sid, events, units, 0.0, 0, 0, to_ms(at)]


def test_times_are_truncated_to_the_millisecond_like_datetime64_3() -> None:
    assert to_ms(NOW) == int(NOW.timestamp() * 1000)
    assert ms_time(to_ms(NOW)) == NOW.replace(microsecond=535_000)
    assert minute_of(NOW) == int(NOW.replace(second=0, microsecond=0).timestamp())
    before_epoch = datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert to_ms(before_epoch) == -1


def test_minutes_stay_sorted_and_sum_per_minute() -> None:
    usage = _Usage()
    assert usage.add(120, 1, 10)
    assert usage.add(0, 2, 20)
    assert usage.add(60, 3, 30)
    assert not usage.add(60, 1, 1)
    assert list(usage.minutes) == [0, 60, 120]
    assert list(usage.requests) == [2, 4, 1]
    assert list(usage.units) == [20, 31, 10]
    assert usage.prune(before=60, streams_before=0) == 1
    assert list(usage.minutes) == [60, 120]


def test_apply_sums_requests_and_units_like_the_store() -> None:
    view = loaded()
    view.apply(
        [
            wire("a", NOW, REQUEST, events=2, units=5),
            wire("a", NOW, STREAM_CLOSED, events=1, units=7, sid="s"),
            wire("a", NOW, STREAM_OPENED, events=1, units=100, sid="t"),
        ],
        {0: to_ms(NOW)},
    )
    since, until = NOW - timedelta(hours=1), NOW + timedelta(minutes=6)
    minute = ms_time(minute_of(NOW) * 1000)
    reads = view.usage_reads("a", since, until, NOW - IDLE)
    # Opened rows add a minute with nothing in it; closed rows add units, not requests.
    assert reads.minutes == [(minute, 2, 12)]
    assert reads.active_streams == 1  # "t" is open, "s" was only closed
    assert reads.reflected_until == ms_time(to_ms(NOW))
    assert reads.account is None


def test_a_stream_is_active_until_closed_or_idle() -> None:
    view = loaded()
    opened = NOW - timedelta(minutes=5)
    view.apply([wire("a", opened, STREAM_OPENED, sid="s")], {})
    assert view.active_streams("a", NOW - IDLE) == 1
    # Idle: the cutoff passes its last announcement (strictly later, to the ms).
    assert view.active_streams("a", opened) == 0
    assert view.active_streams("a", opened - timedelta(milliseconds=1)) == 1
    view.apply([wire("a", NOW, STREAM_CLOSED, sid="s")], {})
    assert view.active_streams("a", NOW - IDLE) == 0


def test_freshness_is_the_slowest_partition_and_only_moves_forward() -> None:
    view = loaded()
    assert view.reflected_until() is None
    view.apply([], {0: 5_000, 1: 3_000})
    view.apply([], {1: 2_000})
    assert view.reflected_until() == ms_time(3_000)


def test_reads_carry_each_partitions_time_in_the_same_snapshot() -> None:
    """What a gateway compares its own requests of an account with: that account's
    partition's time, read with the counts (routes/limits.partition_mark)."""
    view = loaded()
    view.apply([wire("a", NOW)], {0: 5_000, 1: 3_000})
    since, until = NOW - timedelta(hours=1), NOW + timedelta(minutes=6)
    before = view.usage_reads("a", since, until, NOW - IDLE)
    assert before.partitions == {0: ms_time(5_000), 1: ms_time(3_000)}
    assert before.reflected_until == ms_time(3_000)
    view.apply([], {1: 4_000})
    after = view.usage_reads("a", since, until, NOW - IDLE)
    assert after.partitions == {0: ms_time(5_000), 1: ms_time(4_000)}
    assert before.partitions == {0: ms_time(5_000), 1: ms_time(3_000)}  # not mutated


def test_keys_authenticate_until_dropped() -> None:
    view = loaded()
    key, prefix = new_key()
    admin, admin_prefix = new_key()
    view.put_key(prefix, hash_key(key), "acme", admin=False, version=1)
    view.put_key(admin_prefix, hash_key(admin), None, admin=True, version=2)
    assert view.authenticate(key) == Principal("acme", False, prefix)
    assert view.authenticate(admin) == Principal(None, True, admin_prefix)
    assert view.authenticate(key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert view.authenticate("not a key") is None
    view.drop_key(prefix, version=3)
    assert view.authenticate(key) is None


def test_only_a_newer_version_replaces_what_the_view_holds() -> None:
    """A poll answer that raced a local write, or a row re-read by the poll's
    overlap, must never undo a newer write (a revoked key must stay revoked)."""
    view = loaded()
    key, prefix = new_key()
    view.put_key(prefix, hash_key(key), "acme", admin=False, version=10)
    view.drop_key(prefix, version=20)
    view.sync_keys([KeyChange(prefix, hash_key(key), "acme", False, False, 10)])
    assert view.authenticate(key) is None
    view.sync_keys([KeyChange(prefix, hash_key(key), "acme", False, True, 20)])
    assert view.authenticate(key) is None
    other, other_prefix = new_key()
    view.sync_keys([KeyChange(other_prefix, hash_key(other), "", True, False, 5)])
    assert view.authenticate(other) == Principal(None, True, other_prefix)
    assert (view.versions.newest_key, view.versions.newest_account) == (20, 0)
    view.sync_accounts([AccountChange("a", "pro", 3, NOW, 7)])
    view.put_account("a", "free", 3, NOW, version=6)  # older: ignored
    assert view.account("a") == ("pro", 3, ms_time(to_ms(NOW)))
    view.put_account("a", "max", 3, NOW, version=8)
    assert view.account("a") == ("max", 3, ms_time(to_ms(NOW)))


def test_writes_before_the_load_make_a_running_load_start_over() -> None:
    view = UsageView("events", HISTORY, IDLE, 1_000, now=lambda: NOW)
    view.put_account("a", "pro", 1, NOW, version=1)
    assert view.account("a") is None  # not applied: the load reads it from the store
    assert view._stale
    view.apply([wire("a", NOW)], {})
    assert view.rows == 0


def test_past_its_bound_the_view_evicts_the_biggest_accounts_to_the_store() -> None:
    view = loaded(max_rows=10)
    until = NOW + timedelta(hours=1)
    view.apply([wire("big", NOW - timedelta(minutes=m)) for m in range(6)], {})
    view.apply([wire(f"small-{i}", NOW) for i in range(4)], {})
    assert view.rows == 10
    assert not view.evicted
    view.apply([wire("small-4", NOW)], {})  # one row too many
    assert view.evicted == {"big"}  # the most rows: evicting it frees the most
    assert view.rows == 5 <= 10 * 0.9
    assert view.usage_reads("big", NOW - HISTORY, until, NOW - IDLE) is None  # read the store
    small = view.usage_reads("small-4", NOW - HISTORY, until, NOW - IDLE)
    assert small is not None
    assert len(small.minutes) == 1
    view.apply([wire("big", NOW)], {})  # further deltas of an evicted account: not held
    assert view.rows == 5
    assert view.active
    assert view.covers(NOW - HISTORY, NOW - IDLE)


def test_prune_drops_what_no_later_read_needs() -> None:
    clock = [NOW]
    view = UsageView("events", HISTORY, IDLE, 1_000, now=lambda: clock[0])
    view.load(EmptyStore())  # type: ignore[arg-type]
    old = NOW - timedelta(days=40)
    recent = NOW - timedelta(minutes=5)
    view.apply([wire("a", old), wire("a", NOW), wire("b", recent, STREAM_OPENED, sid="s")], {})
    assert view.rows == 4  # three minutes, one stream minute
    clock[0] = NOW + timedelta(days=10)
    view.prune()
    assert view.rows == 2  # the old minute and the idle stream are gone
    assert view.active_streams("b", NOW - IDLE) == 0
    assert view.covers(history_start_any_anchor(clock[0], HISTORY), clock[0] - IDLE)
    assert not view.covers(old, clock[0] - IDLE)


@pytest.mark.parametrize(
    ("since", "until", "count"),
    [
        (NOW.replace(second=0, microsecond=0), NOW + timedelta(minutes=1), 1),
        # The store compares DateTime parameters in whole seconds.
        (NOW.replace(second=0, microsecond=999_000), NOW + timedelta(minutes=1), 1),
        (NOW.replace(second=1), NOW + timedelta(minutes=1), 0),
        (NOW - timedelta(hours=1), NOW.replace(second=0, microsecond=999_999), 0),
    ],
)
def test_minute_bounds_match_the_store(since: datetime, until: datetime, count: int) -> None:
    view = loaded()
    view.apply([wire("a", NOW)], {})
    assert len(view.minutes("a", since, until)) == count
