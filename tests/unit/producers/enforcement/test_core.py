"""The enforcement decision core (producers/enforcement.py): pure, no I/O."""

from __future__ import annotations

from producers.enforcement import (
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    TOO_MANY_STREAMS,
    Enforcer,
    Quota,
    Synced,
)
from tests.structured_fields import parse_list

T0 = 1_800_000_000.0 - (1_800_000_000 % 60)
"""A minute boundary (epoch s)."""
OPEN = Quota(used_micro=0, limit_units=100.0, resets_at=T0 + 3600)


def synced(
    *,
    requests: int = 0,
    minute: float = T0,
    per_minute: int = 10,
    session: Quota = OPEN,
    weekly: Quota = OPEN,
    active: int = 0,
    max_streams: int = 2,
    reflected: float | None = T0,
) -> Synced:
    return Synced(
        per_minute=per_minute,
        minute_start=minute,
        minute_requests=requests,
        session=session,
        weekly=weekly,
        active_streams=active,
        max_streams=max_streams,
        reflected_until=reflected,
    )


def enforcer(margin_s: float = 0.0, stale_after_s: float = 120.0) -> Enforcer:
    return Enforcer(margin_s=margin_s, stale_after_s=stale_after_s)


def test_synced_count_plus_local_requests_hits_the_per_minute_limit() -> None:
    e = enforcer()
    e.apply("a", synced(requests=7), T0 + 1)
    for i in range(3):
        assert e.decide("a", T0 + 2 + i) is None
        e.admit("a", T0 + 2 + i)
    refusal = e.decide("a", T0 + 6)
    assert refusal is not None
    assert refusal.code == RATE_LIMITED
    assert refusal.status == 429
    assert refusal.headers["Retry-After"] == "54"
    assert refusal.headers["X-RateLimit-Remaining"] == "0"
    assert refusal.headers["X-RateLimit-Limit"] == "10"
    assert refusal.headers["X-RateLimit-Reset"] == str(int(T0 + 60))


def test_a_new_minute_starts_from_zero_with_the_same_boundaries_as_the_api() -> None:
    e = enforcer()
    e.apply("a", synced(requests=10), T0 + 30)
    assert e.decide("a", T0 + 59.999) is not None
    # The next UTC minute: the synced count belongs to the last one.
    assert e.decide("a", T0 + 60) is None


def test_local_requests_of_the_last_minute_do_not_count_in_the_next() -> None:
    e = enforcer()
    e.apply("a", synced(requests=0), T0 + 1)
    for i in range(10):
        e.admit("a", T0 + 50 + i * 0.5)
    assert e.decide("a", T0 + 59.9) is not None
    assert e.decide("a", T0 + 60.1) is None


def test_local_uses_are_dropped_once_reflected_so_nothing_is_counted_twice() -> None:
    e = enforcer(margin_s=1.0)
    e.apply("a", synced(requests=0, reflected=T0), T0 + 1)
    for i in range(9):
        e.admit("a", T0 + 2 + i)  # at T0+2 .. T0+10
    # Tally now counted the first five (event times up to T0+6), reflected T0+7.
    e.apply("a", synced(requests=5, reflected=T0 + 7), T0 + 11)
    state = e.state("a")
    assert [u.at for u in state.uses] == [T0 + 7 + i for i in range(4)]
    assert state.minute_requests == {int(T0): 4}
    assert e.decide("a", T0 + 12) is None  # 5 synced + 4 local = 9 < 10
    e.admit("a", T0 + 12)
    assert e.decide("a", T0 + 12.5) is not None  # 10


def test_the_margin_keeps_a_use_until_reflected_well_past_it() -> None:
    e = enforcer(margin_s=2.0)
    e.apply("a", synced(requests=0), T0)
    e.admit("a", T0 + 5)
    e.apply("a", synced(requests=0, reflected=T0 + 6), T0 + 7)
    assert len(e.state("a").uses) == 1  # reflected only 1 s past it: kept
    e.apply("a", synced(requests=1, reflected=T0 + 7), T0 + 8)
    assert not e.state("a").uses


def test_session_at_100_percent_refuses_until_it_resets() -> None:
    e = enforcer()
    session = Quota(used_micro=99_000_000, limit_units=100.0, resets_at=T0 + 600)
    e.apply("a", synced(session=session), T0 + 1)
    assert e.decide("a", T0 + 2) is None
    use = e.admit("a", T0 + 2)
    e.charge("a", use, 1.0)  # 100 units: 100.0 %
    refusal = e.decide("a", T0 + 3)
    assert refusal is not None
    assert refusal.code == QUOTA_EXCEEDED
    assert refusal.headers["Retry-After"] == "597"
    assert "session" in refusal.message
    # Past the window's end only what was used since counts.
    assert e.decide("a", T0 + 600) is None


def test_used_percentage_rounding_is_the_usage_endpoints() -> None:
    e = enforcer()
    # 99.95 % shows as 100.0 on the usage endpoint (half-up): refused here too.
    session = Quota(used_micro=99_950_000, limit_units=100.0, resets_at=T0 + 600)
    e.apply("a", synced(session=session), T0 + 1)
    assert e.decide("a", T0 + 2) is not None
    session = Quota(used_micro=99_949_999, limit_units=100.0, resets_at=T0 + 600)
    e.apply("a", synced(session=session), T0 + 1)
    assert e.decide("a", T0 + 2) is None


def test_weekly_quota_refuses_too() -> None:
    e = enforcer()
    weekly = Quota(used_micro=1_000_000_000, limit_units=1_000.0, resets_at=T0 + 86_400)
    e.apply("a", synced(weekly=weekly), T0 + 1)
    refusal = e.decide("a", T0 + 2)
    assert refusal is not None
    assert refusal.code == QUOTA_EXCEEDED
    assert "weekly" in refusal.message


def test_streams_count_synced_active_plus_local_opened_minus_closed() -> None:
    e = enforcer()
    e.apply("a", synced(active=1, max_streams=2), T0 + 1)
    assert e.decide("a", T0 + 2, opens_stream=True) is None
    e.admit("a", T0 + 2)
    e.stream_opened("a", T0 + 2)
    refusal = e.decide("a", T0 + 3, opens_stream=True)
    assert refusal is not None
    assert refusal.code == TOO_MANY_STREAMS
    # A plain request is not a stream: allowed.
    assert e.decide("a", T0 + 3) is None
    e.stream_closed("a", T0 + 4, units=0.0)
    assert e.decide("a", T0 + 5, opens_stream=True) is None


def test_refusal_headers_are_rfc9651_lists_agreeing_with_x_ratelimit() -> None:
    e = enforcer()
    e.apply("a", synced(requests=10, active=1, max_streams=3), T0 + 1)
    refusal = e.decide("a", T0 + 20.5)
    assert refusal is not None
    policy = {m.value: m.params for m in parse_list(refusal.headers["RateLimit-Policy"])}
    state = {m.value: m.params for m in parse_list(refusal.headers["RateLimit"])}
    assert policy["minute"] == {"q": 10, "w": 60}
    assert policy["streams"]["q"] == 3
    assert state["minute"] == {"r": 0, "t": 40}
    assert state["streams"] == {"r": 2}
    assert int(refusal.headers["X-RateLimit-Reset"]) - (T0 + 20.5) <= state["minute"]["t"]


def test_an_account_never_synced_is_allowed_and_counted_locally() -> None:
    e = enforcer()
    for i in range(20):
        assert e.decide("new", T0 + i * 0.1) is None
        e.admit("new", T0 + i * 0.1)
    assert e.stats.unsynced_allowed == 20
    # Its first answer (nothing counted yet) plus the local uses: over the limit.
    e.apply("new", synced(requests=0, reflected=T0 - 5), T0 + 3)
    assert e.decide("new", T0 + 3) is not None


def test_fail_open_when_the_last_answer_is_stale() -> None:
    e = enforcer(stale_after_s=10.0)
    e.apply("a", synced(requests=10), T0 + 1)
    assert e.decide("a", T0 + 5) is not None
    assert e.decide("a", T0 + 11.5) is None  # last answer 10.5 s old: Tally unreachable
    assert e.stats.unsynced_allowed == 1


def test_an_id_tally_does_not_know_is_never_refused() -> None:
    e = enforcer()
    e.apply("ghost", None, T0)
    assert e.decide("ghost", T0 + 1) is None
    assert e.stats.unsynced_allowed == 0


def test_idle_reflected_accounts_are_forgotten_active_ones_kept() -> None:
    e = enforcer()
    e.apply("idle", synced(), T0)
    e.state("idle").last_seen = T0
    e.admit("busy", T0 + 100)
    assert e.active(T0 + 50) == ["busy"]
    assert "idle" not in e.accounts
