"""The simulated traffic, without Kafka: deterministic, varied, valid, streams accounted for."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.events import encode_event
from producers.loadgen import LoadgenResult, Traffic, traffic
from schemas.events import (
    EVENT_ADAPTER,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
    AnyEvent,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
)


def ticking(start: datetime = datetime(2026, 3, 29, tzinfo=UTC)) -> Callable[[], datetime]:
    """A clock advancing 10 ms per reading."""
    ticks = itertools.count()
    return lambda: start + timedelta(milliseconds=10 * next(ticks))


def run(seed: int, n: int, accounts: int = 500, **options: object) -> list[AnyEvent]:
    return list(traffic(seed, accounts, total=n, clock=ticking(), **options))  # type: ignore[arg-type]


def check_streams(evs: Sequence[AnyEvent], abandoned: set[str], open_at_end: int) -> None:
    opened: dict[str, AnyEvent] = {}
    closed: set[str] = set()
    for e in evs:
        if isinstance(e, StreamOpenedEvent):
            assert e.data.stream_id not in opened
            opened[e.data.stream_id] = e
        elif isinstance(e, StreamClosedEvent):
            sid = e.data.stream_id
            assert sid in opened, "closed before opened"
            assert sid not in closed, "closed twice"
            assert sid not in abandoned
            assert (e.subject, e.source) == (opened[sid].subject, opened[sid].source)
            assert e.time >= opened[sid].time
            closed.add(sid)
    assert abandoned <= opened.keys()
    assert len(opened.keys() - closed - abandoned) == open_at_end


def test_same_seed_same_traffic_other_seed_other_traffic() -> None:
    a, b, c = run(7, 2_000), run(7, 2_000), run(8, 2_000)
    assert [encode_event(e) for e in a] == [encode_event(e) for e in b]
    assert [(e.subject, e.type) for e in a] != [(e.subject, e.type) for e in c]


def test_run_id_changes_ids_but_not_the_shape() -> None:
    a = run(7, 500, run_id="one")
    b = run(7, 500, run_id="two")
    assert {e.id for e in a}.isdisjoint({e.id for e in b})

    def shape(e: AnyEvent) -> tuple[object, ...]:
        return (e.subject, e.source, e.type, e.time, e.data.model_dump(exclude={"stream_id"}))

    assert [shape(e) for e in a] == [shape(e) for e in b]


def test_a_realistic_mix() -> None:
    evs = run(1, 20_000, accounts=1_000, gateways=4)
    types = Counter[str](e.type for e in evs)
    assert types[REQUEST] > 0.7 * len(evs)
    assert types[STREAM_OPENED] > 0.05 * len(evs)
    assert types[STREAM_CLOSED] > 0.05 * len(evs)
    requests = [e for e in evs if isinstance(e, RequestEvent)]
    assert {e.data.route for e in requests} >= {"/v1/messages", "/v1/embeddings"}
    assert {e.data.method for e in requests} == {"GET", "POST"}
    statuses = Counter(e.data.status for e in requests)
    assert statuses[200] > 0.85 * len(requests)
    assert any(s is not None and 400 <= s < 500 for s in statuses)
    assert any(s is not None and s >= 500 for s in statuses)
    assert len({e.data.model for e in requests} - {None}) >= 2
    assert {e.source for e in evs} == {"gw-0", "gw-1", "gw-2", "gw-3"}
    # Units are small, with at most 3 decimals.
    for e in evs:
        if isinstance(e, RequestEvent | StreamClosedEvent):
            assert 0 <= e.data.units <= 100
            assert round(e.data.units, 3) == e.data.units
    # Skewed popularity: the hottest account sees far more than the median one.
    per_account = Counter(e.subject for e in evs).most_common()
    assert per_account[0][0] == "acct-000000"
    assert per_account[0][1] > 20 * per_account[len(per_account) // 2][1]
    assert all(e.subject.startswith("acct-") and len(e.subject) == 11 for e in evs)


def test_every_event_is_valid_and_unique() -> None:
    evs = run(3, 5_000)
    keys = {(e.source, e.id) for e in evs}
    assert len(keys) == len(evs)
    for e in evs:
        assert EVENT_ADAPTER.validate_json(encode_event(e)) == e


def test_a_stream_request_comes_with_its_opened_event() -> None:
    evs = run(4, 3_000)
    for i, e in enumerate(evs):
        if isinstance(e, StreamOpenedEvent):
            before = evs[i - 1]
            assert isinstance(before, RequestEvent)
            assert before.data.route == e.data.route == "/v1/messages"
            assert (before.subject, before.source, before.time) == (e.subject, e.source, e.time)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 600))
def test_a_bounded_run_closes_every_stream_but_the_abandoned(seed: int, n: int) -> None:
    flow = traffic(seed, 50, total=n, clock=ticking())
    evs = list(flow)
    assert len(evs) == n == flow.emitted
    assert flow.open_streams == 0
    assert flow.finish() == []
    check_streams(evs, flow.abandoned, open_at_end=0)


def test_an_endless_run_is_closed_by_finish() -> None:
    flow = Traffic(5, 100, clock=ticking(), abandon_fraction=0.1)
    evs = list(itertools.islice(flow, 3_000))
    assert flow.open_streams > 0
    check_streams(evs, flow.abandoned, open_at_end=flow.open_streams)
    tail = flow.finish()
    assert len(tail) > 0
    assert all(isinstance(e, StreamClosedEvent) for e in tail)
    check_streams(evs + tail, flow.abandoned, open_at_end=0)
    assert flow.abandoned, "some streams are left open on purpose"


def test_given_account_ids_are_used() -> None:
    evs = run(2, 1_000, account_ids=["alice", "bob"])
    assert {e.subject for e in evs} == {"alice", "bob"}


@pytest.mark.parametrize(
    "kwargs", [{"accounts": 0}, {"gateways": 0}, {"account_ids": []}, {"total": -1}]
)
def test_rejects_nonsense(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"accounts": 10} | kwargs
    accounts = args.pop("accounts")
    with pytest.raises(ValueError, match=r"at least|>= 0"):
        Traffic(1, accounts, **args)  # type: ignore[arg-type]


def test_result_rate() -> None:
    result = LoadgenResult(
        requests=80, streams_opened=10, streams_closed=10, streams_left_open=0, elapsed_s=2.0
    )
    assert (result.events, result.rate) == (100, 50.0)
