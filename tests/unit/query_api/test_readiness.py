"""/readyz's verdict from its signals, and what it logs (query_api/readiness.py).

tests/integration/test_readiness.py drives the same verdicts from real components;
here, the cases those cannot stage cheaply (a lagging partition) and the log levels.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from query_api.queries import PipelineMarks
from query_api.readiness import Observed, Readiness, Reason, judge
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


async def test_not_ready_while_starting_is_info_and_a_lost_worker_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    probe = Scripted(ApiSettings(readyz_refresh_s=1.0), store=None, now=lambda: NOW)  # type: ignore[arg-type]
    probe.clock = lambda: clock[0]

    async def step(signals: Observed) -> None:
        probe.signals = signals
        clock[0] += 1.0
        await probe.verdict()
        while probe._checking is not None:  # the refresh runs in the background
            await probe._checking

    caplog.set_level(logging.INFO, logger="tally.api.readiness")
    await step(seen(members=0))
    await step(seen(members=0))  # unchanged: no second line
    await step(seen())
    await step(seen(members=0))
    await step(seen(members=0))
    levels = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert levels == [
        ("INFO", "not ready (no_worker)"),
        ("INFO", "ready"),
        ("WARNING", "not ready (no_worker)"),
    ]


async def test_a_start_that_never_becomes_ready_warns_once_past_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    probe = Scripted(
        ApiSettings(readyz_refresh_s=1.0, processors_stale_s=5.0),
        store=None,  # type: ignore[arg-type]
        now=lambda: NOW,
    )
    probe.clock = lambda: clock[0]
    probe.signals = seen(reflected_s=None, sink_s=None)
    caplog.set_level(logging.INFO, logger="tally.api.readiness")
    for _ in range(10):
        clock[0] += 1.0
        await probe.verdict()
        while probe._checking is not None:
            await probe._checking
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]
