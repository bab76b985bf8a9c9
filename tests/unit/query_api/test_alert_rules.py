"""Which alerts usage calls for (query_api/alerts/rules.py), against the usage endpoints'
own computation (query_api/usage.py) for the percentages and windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from query_api.alerts.rules import CROSSED, PROJECTED, Alert, alert_id, due, event_body
from query_api.plans import DEFAULT_PLANS, Plan, PlanConfigError, load_plans
from query_api.queries import MinuteRow
from query_api.usage import compute
from schemas.windows import used_percentage

T0 = datetime(2026, 3, 30, 10, 0, tzinfo=UTC)  # a Monday
LATE = timedelta(hours=1)
M = 1_000_000


def plan(**fields: object) -> Plan:
    base = DEFAULT_PLANS["free"].model_dump()  # session 100, weekly 1,000
    return Plan.model_validate({**base, **fields})


def rows(*minutes: tuple[int, float]) -> list[MinuteRow]:
    """(minutes after T0, units) -> one request row per minute."""
    return [(T0 + timedelta(minutes=m), 1, int(u * M)) for m, u in minutes]


def crossed(alerts: list[Alert]) -> set[tuple[str, int]]:
    return {(a.window, a.threshold) for a in alerts if a.type == CROSSED}


def test_nothing_below_the_first_threshold() -> None:
    assert crossed(due("a", rows((0, 79)), plan(), T0 + timedelta(minutes=1), LATE)) == set()


def test_each_threshold_reached_is_one_alert_per_window() -> None:
    found = due("a", rows((0, 50), (1, 30)), plan(), T0 + timedelta(minutes=2), LATE)
    assert crossed(found) == {("session", 80)}
    found = due("a", rows((0, 50), (1, 50)), plan(), T0 + timedelta(minutes=2), LATE)
    assert crossed(found) == {("session", 80), ("session", 100)}
    heavy = rows((0, 850))
    assert crossed(due("a", heavy, plan(), T0 + timedelta(minutes=1), LATE)) == {
        ("session", 80), ("session", 100), ("weekly", 80),
    }  # fmt: skip


def test_the_percentage_and_window_are_the_usage_endpoints() -> None:
    history = rows((0, 40), (7, 39.96), (30, 5))
    now = T0 + timedelta(minutes=31)
    usage = compute(history, plan(), 1, now)
    assert usage.session.window is not None
    found = [a for a in due("a", history, plan(), now, LATE) if a.window == "session"]
    assert [a.threshold for a in found if a.type == CROSSED] == [80]
    alert = found[0]
    assert alert.used_percentage == used_percentage(usage.session.used_micro, 100)
    assert (alert.start, alert.resets_at) == (usage.session.window.start, usage.session.window.end)


def test_the_identity_is_stable_and_names_the_window_start() -> None:
    now = T0 + timedelta(minutes=2)
    first = due("a", rows((0, 90)), plan(), now, LATE)
    again = due("a", rows((0, 90), (1, 1)), plan(), now, LATE)
    assert {a.id for a in first if a.type == CROSSED} == {a.id for a in again if a.type == CROSSED}
    a = first[0]
    assert a.id == alert_id(CROSSED, "a", "session", T0, 80)
    assert a.id != alert_id(CROSSED, "b", "session", T0, 80)
    assert a.id != alert_id(CROSSED, "a", "session", T0 + timedelta(hours=5), 80)
    assert a.id != alert_id(PROJECTED, "a", "session", T0, 80)


def test_a_fixed_session_that_resets_and_is_crossed_again_is_a_new_alert() -> None:
    fixed = plan(session_anchor="fixed", session_hours=1, weekly_limit=1_000_000)
    first = due("a", rows((0, 85)), fixed, T0 + timedelta(minutes=1), LATE)
    later = due("a", rows((0, 85), (61, 85)), fixed, T0 + timedelta(minutes=62), LATE)
    ids = {a.id for a in first if a.type == CROSSED}
    later_ids = {a.id for a in later if a.type == CROSSED}
    assert len(ids) == 1
    assert ids < later_ids
    assert len(later_ids) == 2
    starts = sorted(a.start for a in later if a.type == CROSSED)
    assert starts == [T0, T0 + timedelta(hours=1)]


def test_late_events_raise_alerts_for_an_ended_window_only_within_the_grace() -> None:
    fixed = plan(session_anchor="fixed", session_hours=1, weekly_limit=1_000_000)
    late_rows = rows((10, 85))  # counted now, but in the 10:00-11:00 window
    within = due("a", late_rows, fixed, T0 + timedelta(minutes=60 + 59), LATE)
    assert {(a.window, a.start) for a in within} == {("session", T0)}
    beyond = due("a", late_rows, fixed, T0 + timedelta(minutes=60 + 61), LATE)
    assert beyond == []


def test_first_request_windows_both_anchors() -> None:
    both = plan(weekly_anchor="first_request", weekly_limit=200)
    found = due("a", rows((5, 170)), both, T0 + timedelta(minutes=6), LATE)
    assert crossed(found) == {("session", 80), ("session", 100), ("weekly", 80)}
    assert {a.start for a in found} == {T0 + timedelta(minutes=5)}


def test_projected_once_the_rate_reaches_the_limit_before_the_reset() -> None:
    # 10 units a minute for 5 minutes of a 5-hour session: 50 %, heading far past 100.
    history = rows(*((m, 10) for m in range(5)))
    found = due("a", history, plan(), T0 + timedelta(minutes=5), LATE)
    projected = [a for a in found if a.type == PROJECTED]
    # The week heads past 1,000 too, at 2,400 units a day.
    assert [(a.window, a.threshold) for a in projected] == [("session", 100), ("weekly", 100)]
    roomy = plan(weekly_limit=1_000_000)
    found = due("a", history, roomy, T0 + timedelta(minutes=5), LATE)
    assert [a.window for a in found if a.type == PROJECTED] == ["session"]
    quiet = rows((0, 10))
    assert not [
        a for a in due("a", quiet, plan(), T0 + timedelta(hours=4), LATE) if a.type == PROJECTED
    ]


def test_the_event_body_is_the_contracts() -> None:
    alert = due("acme", rows((0, 81.2)), plan(name="pro"), T0 + timedelta(minutes=1), LATE)[0]
    body = event_body(alert, T0 + timedelta(minutes=1))
    assert body == {
        "type": "usage.threshold.crossed",
        "timestamp": "2026-03-30T10:01:00.000Z",
        "data": {
            "account": "acme",
            "plan": "pro",
            "window": "session",
            "threshold": 80,
            "used_percentage": 81.2,
            "window_start": "2026-03-30T10:00:00.000Z",
            "resets_at": "2026-03-30T15:00:00.000Z",
        },
    }


def test_thresholds_are_a_plan_field_configurable_by_tally_plans() -> None:
    assert DEFAULT_PLANS["pro"].alert_thresholds == (80, 100)
    plans = load_plans('{"pro": {"alert_thresholds": [50, 90, 100]}}')
    assert plans["pro"].alert_thresholds == (50, 90, 100)
    for bad in ("[100, 80]", "[80, 80]", "[0]", "[80.5]"):
        with pytest.raises(PlanConfigError, match="alert_thresholds"):
            load_plans(f'{{"pro": {{"alert_thresholds": {bad}}}}}')
    custom = plan(alert_thresholds=[50])
    assert crossed(due("a", rows((0, 55)), custom, T0 + timedelta(minutes=1), LATE)) == {
        ("session", 50)
    }
