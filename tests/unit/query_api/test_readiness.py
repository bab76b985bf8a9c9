"""/readyz's verdict from its signals, and what it logs (query_api/readiness.py).

tests/integration/test_readiness.py drives the same verdicts from real components;
here, the cases those cannot stage cheaply (a lagging partition) and the log levels.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from query_api.queries import PipelineMarks
from query_api.readiness import WARN_AFTER_S, Observed, Readiness, Reason, judge
from query_api.settings import ApiSettings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STALE_S = 30.0


def seen(
    reflected_s: float | None = 1.0,
    sink_s: float | None = 1.0,
    members: int | None = 1,
    store_error: str | None = None,
    kafka_error: str | None = None,
) -> Observed:
    """Signals with each report `*_s` seconds old (None: never)."""

    def ago(seconds: float | None) -> datetime | None:
        return None if seconds is None else NOW - timedelta(seconds=seconds)

    return Observed(
        marks=None if store_error else PipelineMarks(ago(reflected_s), ago(sink_s)),
        store_error=store_error,
        members=None if kafka_error else members,
        kafka_error=kafka_error,
        now=NOW,
    )


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (seen(), None),
        (seen(reflected_s=STALE_S), None),
        (seen(store_error="Code: 81. DB::Exception"), Reason.STORE_UNREACHABLE),
        (seen(store_error="down", kafka_error="down"), Reason.STORE_UNREACHABLE),
        (seen(kafka_error="KafkaConnectionError"), Reason.KAFKA_UNREACHABLE),
        (seen(members=0), Reason.NO_WORKER),
        (seen(members=0, reflected_s=None, sink_s=None), Reason.NO_WORKER),
        (seen(reflected_s=None, sink_s=None), Reason.NO_SINK),
        (seen(reflected_s=STALE_S + 1, sink_s=STALE_S + 1), Reason.NO_SINK),
        # The sink writes, but a partition's counting lags: the workers are behind.
        (seen(reflected_s=STALE_S + 1, sink_s=2.0), Reason.PROCESSORS_BEHIND),
        (seen(reflected_s=None, sink_s=2.0), Reason.PROCESSORS_BEHIND),
    ],
)
def test_the_first_broken_link_is_the_reason(signals: Observed, expected: Reason | None) -> None:
    verdict = judge(signals, STALE_S)
    assert verdict.reason == expected
    assert verdict.ready is (expected is None)
    assert set(verdict.checks.values()) <= {"ok", "unknown", *Reason}
    if expected is not None:
        assert list(verdict.checks.values()).count(expected) == 1


def test_error_text_stays_out_of_the_checks() -> None:
    verdict = judge(seen(store_error="Code: 81. UNKNOWN_DATABASE tenant_a"), STALE_S)
    assert "UNKNOWN_DATABASE" in verdict.detail
    assert "UNKNOWN_DATABASE" not in repr(verdict.checks)


class Scripted(Readiness):
    """Readiness whose signals and clock the test sets."""

    signals: Observed = seen()

    async def _observe(self) -> Observed:
        return self.signals


class Stepper:
    """A Scripted readiness on a clock the test moves, one check per step."""

    def __init__(self, **settings: float) -> None:
        self.clock = 0.0
        self.probe = Scripted(
            ApiSettings(readyz_refresh_s=1.0, **settings),  # type: ignore[arg-type]
            store=None,  # type: ignore[arg-type]
            now=lambda: NOW,
        )
        self.probe.clock = lambda: self.clock

    async def step(self, signals: Observed, seconds: float = 1.0) -> None:
        self.probe.signals = signals
        self.clock += seconds
        await self.probe.verdict()
        while self.probe._checking is not None:  # the refresh runs in the background
            await self.probe._checking


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]


async def test_short_spells_are_info_and_a_lasting_one_a_single_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tally.api.readiness")
    s = Stepper()
    await s.step(seen(members=0))  # starting up
    await s.step(seen(members=0))  # unchanged: no second line
    await s.step(seen())
    await s.step(seen(members=0))  # a rebalance, a stop: short
    await s.step(seen())
    assert lines(caplog) == [
        ("INFO", "not ready (no_worker)"),
        ("INFO", "ready"),
        ("INFO", "not ready (no_worker)"),
        ("INFO", "ready"),
    ]
    caplog.clear()
    for _ in range(int(WARN_AFTER_S) + 5):  # the worker is gone for good
        await s.step(seen(members=0))
    assert lines(caplog) == [
        ("INFO", "not ready (no_worker)"),
        ("WARNING", f"not ready for {WARN_AFTER_S:.0f}s (no_worker)"),
    ]


async def test_a_start_that_never_becomes_ready_warns_once_past_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tally.api.readiness")
    s = Stepper(processors_stale_s=20.0)
    for _ in range(30):
        await s.step(seen(reflected_s=None, sink_s=None))
    assert lines(caplog) == [
        ("INFO", "not ready (no_sink)"),
        ("WARNING", "not ready for 20s (no_sink)"),
    ]
