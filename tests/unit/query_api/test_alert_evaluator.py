"""The evaluator's bookkeeping (query_api/alerts/evaluator.py), with a stand-in store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest.mock import MagicMock

from query_api.alerts.evaluator import PRUNE_EVERY, AlertEvaluator, delivery_id
from query_api.alerts.settings import AlertSettings
from query_api.plans import DEFAULT_PLANS
from schemas.store import Store

T0 = datetime(2026, 3, 30, 10, 0, tzinfo=UTC)


def test_ids_of_windows_closed_to_alerts_are_forgotten(tmp_path: Path) -> None:
    clock = [T0]
    settings = AlertSettings(data_dir=tmp_path, alerts_late_s=3600)
    evaluator = AlertEvaluator(
        MagicMock(spec=Store), settings, DEFAULT_PLANS, timedelta(days=42), None, lambda: clock[0]
    )
    evaluator._emitted = {"old": T0 - timedelta(hours=2), "open": T0 + timedelta(hours=1)}
    evaluator._prune()
    assert set(evaluator._emitted) == {"old", "open"}, "pruned before PRUNE_EVERY"
    clock[0] = T0 + PRUNE_EVERY
    evaluator._prune()
    assert set(evaluator._emitted) == {"open"}


def test_webhook_ids_are_derived_per_alert_and_endpoint() -> None:
    assert delivery_id("alrt_1", "whep_1") == delivery_id("alrt_1", "whep_1")
    assert delivery_id("alrt_1", "whep_1") != delivery_id("alrt_1", "whep_2")
    assert delivery_id("alrt_1", "whep_1") != delivery_id("alrt_2", "whep_1")
    assert delivery_id("alrt_1", "whep_1").startswith("msg_")
