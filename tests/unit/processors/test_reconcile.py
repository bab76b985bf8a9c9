"""The pure half of `tally reconcile`: recounting the log and comparing with rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from processors.decode import Limits
from processors.reconcile import Recount
from producers import events as build
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import MARKER_ACCOUNT, MARKER_TYPE
from schemas.totals import AccountTotals, compare, format_units, stored_totals
from schemas.windows import minute_range

T0 = datetime(2026, 3, 29, 10, 0, tzinfo=UTC)
SINCE, UNTIL = T0, T0 + timedelta(hours=1)
LIMITS = Limits()


def _recount(account: str | None = None) -> Recount:
    return Recount(SINCE, UNTIL, LIMITS, account)


def _message(*events: build.AnyEvent) -> bytes:
    if len(events) == 1:
        return build.encode_event(events[0])
    return b"[" + b",".join(build.encode_event(e) for e in events) + b"]"


def _add(recount: Recount, *events: build.AnyEvent, published: datetime | None = None) -> None:
    """One message, published when its first event happened unless told otherwise."""
    recount.add_message(_message(*events), published or events[0].time)


# -- the range -------------------------------------------------------------------------


M = timedelta(minutes=1)


@pytest.mark.parametrize(
    ("start", "end", "want"),
    [
        (T0, T0 + 60 * M, (T0, T0 + 60 * M)),
        # A minute counts when its start is inside: 10:00:30 begins with 10:01...
        (T0 + timedelta(seconds=30), T0 + 5 * M, (T0 + M, T0 + 5 * M)),
        # ...and an end inside a minute keeps that minute (it starts before the end).
        (T0, T0 + 5 * M + timedelta(seconds=1), (T0, T0 + 6 * M)),
        # No minute starts inside: empty.
        (T0 + timedelta(microseconds=1), T0 + M, (T0 + M, T0 + M)),
    ],
)
def test_minute_range_keeps_the_minutes_starting_inside(
    start: datetime, end: datetime, want: tuple[datetime, datetime]
) -> None:
    # One rule for reconcile, /admin/totals and the analytics API: the same minutes.
    assert minute_range(start, end) == want


def test_minute_range_converts_zones_and_refuses_naive_times() -> None:
    plus2 = datetime(2026, 3, 29, 14, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert minute_range(plus2, plus2 + 2 * M) == (
        datetime(2026, 3, 29, 12, 1, tzinfo=UTC),
        datetime(2026, 3, 29, 12, 3, tzinfo=UTC),
    )
    with pytest.raises(ValueError, match="zone"):
        minute_range(datetime(2026, 1, 1), T0)


def test_recount_needs_an_aligned_range() -> None:
    with pytest.raises(ValueError, match="minute-aligned"):
        Recount(T0 + timedelta(seconds=1), UNTIL, LIMITS)


def test_range_edges_follow_the_event_minute() -> None:
    recount = _recount()
    inside = [
        build.request("a", "gw", time=SINCE),
        build.request("a", "gw", time=UNTIL - timedelta(microseconds=1)),
        build.request("a", "gw", time=SINCE + timedelta(seconds=59.999)),
    ]
    outside = [
        build.request("a", "gw", time=SINCE - timedelta(microseconds=1)),
        build.request("a", "gw", time=UNTIL),
        build.request("b", "gw", time=UNTIL + timedelta(minutes=3)),
    ]
    for event in inside + outside:
        _add(recount, event)
    assert recount.totals == {"a": AccountTotals(3, 3_000_000, {REQUEST: 3})}
    assert recount.stats.counted == 3
    assert recount.stats.events == 6


# -- deduplication ---------------------------------------------------------------------


def test_a_resent_event_counts_once_however_far_apart() -> None:
    recount = _recount()
    first = build.request("a", "gw-1", units=2.0, time=T0 + timedelta(minutes=1))
    _add(recount, first)
    for i in range(50):  # lots of traffic in between: far beyond any dedup window
        _add(recount, build.request("b", "gw-1", time=T0 + timedelta(minutes=2, seconds=i)))
    # Re-sent much later, inside a batch, published 30 minutes after the first copy.
    again = build.request("c", "gw-1", time=T0 + timedelta(minutes=3))
    _add(recount, again, first, published=T0 + timedelta(minutes=31))
    assert recount.totals["a"] == AccountTotals(1, 2_000_000, {REQUEST: 1})
    assert recount.stats.duplicates == 1


def test_dedup_key_is_source_and_id_exactly() -> None:
    recount = _recount()
    at = T0 + timedelta(minutes=1)
    _add(recount, build.request("a", "gw-1", time=at, id="e-1"))
    _add(recount, build.request("a", "gw-2", time=at, id="e-1"))  # other source: counts
    _add(recount, build.request("a", "gw-1", time=at, id="E-1"))  # ids are case-sensitive
    _add(recount, build.request("a", "gw-1", time=at, id="e-1"))  # the re-send
    assert recount.totals["a"].requests == 3
    assert recount.stats.duplicates == 1


def test_the_first_copy_wins_even_outside_the_range() -> None:
    # The worker counts the first copy (in the minute it names) and drops the later one;
    # a recount of the range must not count the later copy either.
    recount = _recount()
    before = build.request("a", "gw", time=SINCE - timedelta(minutes=1), id="x")
    later = build.request("a", "gw", time=SINCE + timedelta(minutes=1), id="x")
    _add(recount, before)
    _add(recount, later)
    assert recount.totals == {}
    assert recount.stats.duplicates == 1


def test_dedup_spans_accounts_and_the_account_filter_applies_after_it() -> None:
    recount = _recount(account="b")
    at = T0 + timedelta(minutes=1)
    _add(recount, build.request("a", "gw", time=at, id="same"))
    _add(recount, build.request("b", "gw", time=at, id="same"))  # a re-send under another subject
    _add(recount, build.request("b", "gw", time=at, id="other"))
    assert recount.totals == {"b": AccountTotals(1, 1_000_000, {REQUEST: 1})}


def test_rejected_copies_take_no_part_in_dedup() -> None:
    recount = _recount()
    event = build.request("a", "gw", time=T0 + timedelta(minutes=20), id="e")
    # Judged at its publish time, 10 minutes before the event: too far in the future.
    _add(recount, event, published=event.time - timedelta(minutes=10))
    assert recount.stats.rejected == 1
    # The retry, published in time, is the first valid copy and counts.
    _add(recount, event, published=event.time)
    assert recount.totals["a"].requests == 1
    assert recount.stats.duplicates == 0


# -- validation, as the worker applies it ------------------------------------------------


def test_messages_are_judged_at_their_publish_time() -> None:
    recount = _recount()
    at = T0 + timedelta(minutes=10)
    event = build.request("a", "gw", time=at)
    # 5 minutes ahead is allowed, a second more is not.
    _add(recount, event, published=at - timedelta(minutes=5))
    late = build.request("a", "gw", time=at)
    _add(recount, late, published=at + LIMITS.max_lateness + timedelta(seconds=1))
    future = build.request("a", "gw", time=at)
    _add(recount, future, published=at - timedelta(minutes=5, seconds=1))
    assert recount.totals["a"].requests == 1
    assert recount.stats.rejected == 2


def test_junk_is_rejected_and_valid_neighbours_in_a_batch_count() -> None:
    recount = _recount()
    at = T0 + timedelta(minutes=1)
    good = build.request("a", "gw", time=at)
    recount.add_message(b"{not json", at)
    recount.add_message(None, at)
    batch = b"[" + build.encode_event(good) + b',{"specversion":"1.0"},17]'
    recount.add_message(batch, at)
    assert recount.stats.rejected == 4
    assert recount.stats.messages == 3
    assert recount.totals["a"].requests == 1


def test_units_of_requests_and_closed_streams_in_exact_millionths() -> None:
    recount = _recount()
    at = T0 + timedelta(minutes=1)
    _add(
        recount,
        build.request("a", "gw", units=0.1, time=at),
        build.request("a", "gw", units=0.2, time=at),
        build.stream_opened("a", "gw", "s1", time=at),
        build.stream_closed("a", "gw", "s1", units=12.345678, time=at),
    )
    assert recount.totals["a"] == AccountTotals(
        requests=2,
        units_micro=100_000 + 200_000 + 12_345_678,
        events={REQUEST: 2, STREAM_OPENED: 1, STREAM_CLOSED: 1},
    )


# -- the rollup side -------------------------------------------------------------------


def test_stored_totals_skip_markers_and_count_units_of_requests_and_closes() -> None:
    rows = [
        ("a", REQUEST, 3, 3_000_000),
        ("a", REQUEST, 2, 500_000),  # merges are eventual: several rows per key
        ("a", STREAM_OPENED, 1, 7),  # units on an open are not usage
        ("a", STREAM_CLOSED, 1, 4_000_000),
        (MARKER_ACCOUNT, MARKER_TYPE, 0, 0),
        ("b", REQUEST, 0, 0),
    ]
    assert stored_totals(rows) == {
        "a": AccountTotals(5, 7_500_000, {REQUEST: 5, STREAM_OPENED: 1, STREAM_CLOSED: 1}),
        "b": AccountTotals(),
    }


# -- comparing ---------------------------------------------------------------------------


def _totals(requests: int, units: int = 0, closes: int = 0) -> AccountTotals:
    events = {REQUEST: requests} if requests else {}
    if closes:
        events[STREAM_CLOSED] = closes
    return AccountTotals(requests, units, events)


def test_equal_totals_are_no_drift() -> None:
    expected = {"a": _totals(3, 3_000_000), "b": _totals(1, 500_000, closes=1)}
    stored = {"a": _totals(3, 3_000_000), "b": _totals(1, 500_000, closes=1), "z": _totals(0)}
    report = compare(expected, stored, SINCE, UNTIL)
    assert report.ok
    assert report.drifts == ()
    assert (report.accounts, report.events, report.units_micro) == (3, 5, 3_500_000)


def test_over_and_under_counts_are_drift_with_signed_deltas() -> None:
    expected = {"a": _totals(3, 3_000_000), "b": _totals(2, 2_000_000)}
    stored = {"a": _totals(4, 4_000_000), "b": _totals(2, 1_000_000)}
    report = compare(expected, stored, SINCE, UNTIL)
    assert not report.ok
    a, b = report.drifts
    assert a.account == "a"
    assert [(d.measure, d.expected, d.stored, d.delta) for d in a.differences] == [
        ("requests", 3, 4, 1),
        ("units_micro", 3_000_000, 4_000_000, 1_000_000),
        (f"events.{REQUEST}", 3, 4, 1),
    ]
    assert b.account == "b"
    assert [(d.measure, d.delta) for d in b.differences] == [("units_micro", -1_000_000)]


def test_accounts_missing_on_either_side_are_drift() -> None:
    expected = {"only-log": _totals(2, 2_000_000), "both": _totals(1, 1)}
    stored = {"only-rollups": _totals(0, 0, closes=1), "both": _totals(1, 1)}
    report = compare(expected, stored, SINCE, UNTIL)
    by_account = {d.account: d for d in report.drifts}
    assert set(by_account) == {"only-log", "only-rollups"}
    assert by_account["only-log"].stored is None
    assert by_account["only-log"].expected == _totals(2, 2_000_000)
    assert by_account["only-rollups"].expected is None
    assert [(d.measure, d.expected, d.stored) for d in by_account["only-rollups"].differences] == [
        (f"events.{STREAM_CLOSED}", 0, 1)
    ]


def test_an_unknown_type_in_the_rollups_is_drift() -> None:
    stored = {"a": AccountTotals(1, 1_000_000, {REQUEST: 1, "tally.other.v1": 2})}
    report = compare({"a": _totals(1, 1_000_000)}, stored, SINCE, UNTIL)
    assert [d.measure for d in report.drifts[0].differences] == ["events.tally.other.v1"]


def test_recount_then_compare_end_to_end() -> None:
    recount = _recount()
    at = T0 + timedelta(minutes=5)
    events = [build.request(f"acct-{i % 3}", "gw", units=1.5, time=at) for i in range(9)]
    for event in events:
        _add(recount, event)
    _add(recount, events[0])  # a re-send
    stored = stored_totals([(f"acct-{i}", REQUEST, 3, 4_500_000) for i in range(3)])
    assert compare(recount.totals, stored, SINCE, UNTIL).ok
    stored["acct-1"].requests += 1
    stored["acct-1"].events[REQUEST] += 1
    report = compare(recount.totals, stored, SINCE, UNTIL)
    assert [d.account for d in report.drifts] == ["acct-1"]


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0"),
        (1_500_000, "1.5"),
        (1_000_000, "1"),
        (-250, "-0.00025"),
        (1_234_000_001, "1,234.000001"),
    ],
)
def test_format_units_is_exact(micro: int, text: str) -> None:
    assert format_units(micro) == text


def test_message_values_are_decoded_like_the_worker_does() -> None:
    # A message whose JSON is fine but whose event is invalid is a rejection, not a crash.
    recount = _recount()
    doc = orjson.loads(build.encode_event(build.request("a", "gw", time=T0)))
    doc["subject"] = "has space"
    recount.add_message(orjson.dumps(doc), T0)
    assert recount.stats.rejected == 1
    assert recount.totals == {}
