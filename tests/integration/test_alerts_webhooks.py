"""Alerts end to end (docs/alerts.md): gateway events through a real worker, sink and
store; the evaluator beside the sink; deliveries to a receiver in its own uvicorn
process that verifies every signature independently (tests/webhook_receiver.py).

One account is driven across 80 % and 100 % of its session and of its week. The
receiver answers 500 for its first 30 seconds: every crossing must still arrive, each
under one webhook-id (its retries share it), each exactly once with a 2xx; the same
events must be on `tally.alerts` keyed by alert id; and a restarted evaluator
(a new process's) must find every crossing already emitted.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import running_pipeline
from processors.settings import WorkerSettings
from producers import events as build
from producers.gateway import Gateway
from query_api.accounts import AccountStore
from query_api.alerts import admin
from query_api.alerts.evaluator import AlertEvaluator, delivery_id
from query_api.alerts.models import WebhookCreateIn
from query_api.alerts.rules import CROSSED
from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox
from query_api.alerts.store import DELIVERED, AlertStore
from query_api.plans import DEFAULT_PLANS
from schemas.events import REQUEST
from schemas.store import Store
from tests.conftest import consume_all
from tests.rollups import ms, write_wire
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

FAIL_S = 30.0
"""How long the receiver answers 500 before it answers 200 (the issue's outage)."""


@pytest.fixture
def alerts_env(
    pipeline_settings: WorkerSettings, pipeline_store: Store, tmp_path: Path
) -> tuple[AlertSettings, Store]:
    settings = AlertSettings(
        data_dir=tmp_path,
        alerts_topic=f"{pipeline_settings.events_topic}.alerts",
        webhook_allow_private=True,  # the receiver is on loopback
        # Growing delays spanning more than the outage (39.5 s in all), as the default
        # schedule spans more than 24 h.
        webhook_retry_schedule_s="0.5,1,2,4,8,8,8,8",
        webhook_timeout_s=5,
        alerts_interval_s=0.2,
    )
    return settings, pipeline_store


async def _until(what: str, check: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_every_crossing_arrives_once_signed_through_failures_and_restarts(
    pipeline_settings: WorkerSettings,
    alerts_env: tuple[AlertSettings, Store],
    receiver: Receiver,
) -> None:
    settings, store = alerts_env
    AccountStore(store).create("acme", "free")  # session 100 units, week 1,000
    alerts = AlertStore(store)
    box = SecretBox.from_settings(settings)
    endpoint = await admin.create(alerts, box, settings, WebhookCreateIn(url=receiver.url))
    receiver.start(endpoint.secret, FAIL_S)
    bootstrap = pipeline_settings.bootstrap

    evaluator = AlertEvaluator(store, settings, DEFAULT_PLANS, timedelta(days=42), bootstrap)
    await evaluator.start()
    running = asyncio.Event()
    evaluating = asyncio.create_task(evaluator.run(running))
    crossings = [(85, {("session", 80)}), (20, {("session", 100)}),
                 (700, {("weekly", 80)}), (200, {("weekly", 100)})]  # fmt: skip
    expected: set[tuple[str, int]] = set()
    try:
        async with running_pipeline(pipeline_settings, store) as (_, sink):
            sink.add_listener(evaluator.on_applied)
            async with Gateway(bootstrap, pipeline_settings.events_topic) as gateway:
                for units, crossed in crossings:
                    # Two events per step, so a step is also a run of several deltas.
                    for _ in range(2):
                        await gateway.record(build.request("acme", "gw-1", units=units / 2))
                    await gateway.flush()
                    expected |= crossed
                    await _until(
                        f"alerts {sorted(expected)}",
                        lambda e=expected: (
                            {
                                (a.window, a.threshold)
                                for a in alerts.alerts("acme")
                                if a.type == CROSSED
                            }
                            >= e
                        ),
                    )
            delivered = lambda: {  # noqa: E731
                r["id"] for r in receiver.received() if r["status"] == 200
            }
            await _until("four deliveries answered 200", lambda: len(delivered()) >= 4)
            await asyncio.sleep(1.5)  # nothing more arrives (retries have all stopped)
    finally:
        running.set()
        await evaluating
        await evaluator.stop()

    stored = [a for a in alerts.alerts("acme") if a.type == CROSSED]
    assert sorted((a.window, a.threshold) for a in stored) == sorted(expected)
    received = receiver.received()
    assert received
    assert all(r["verified"] for r in received), "a signature did not verify"
    assert any(r["status"] == 500 for r in received), "the receiver never failed: no retry shown"
    ok = [r for r in received if r["status"] == 200]
    ids = {delivery_id(a.id, endpoint.id) for a in stored}
    # Exactly one 2xx per crossing, under the webhook-id derived from the alert.
    assert sorted(r["id"] for r in ok) == sorted(ids)
    for r in received:
        body = json.loads(r["body"])
        assert body["type"] == CROSSED
        assert body["data"]["account"] == "acme"
    # Every attempt of one crossing carried the same webhook-id and the same body.
    by_id: dict[str, set[str]] = {}
    for r in received:
        by_id.setdefault(r["id"], set()).add(r["body"])
    assert set(by_id) == ids
    assert all(len(bodies) == 1 for bodies in by_id.values())
    # The delivery log: every attempt with its status code, all delivered in the end.
    deliveries = admin.deliveries(alerts, endpoint.id, 100)
    assert {d.status for d in deliveries} == {DELIVERED}
    assert sum(len(d.log) for d in deliveries) == len(received)
    assert {a.status_code for d in deliveries for a in d.log} <= {200, 500}

    # Kafka: the same events, keyed by alert id (projected alerts too).
    records = await consume_all(bootstrap, settings.alerts_topic, 1)
    keyed = {r.key.decode(): json.loads(r.value) for r in records}
    assert {a.id for a in stored} <= set(keyed)
    assert len(records) == len(keyed), "an alert was published twice"

    # A restarted evaluator (catching up on every recent account) emits nothing new.
    again = AlertEvaluator(store, settings, DEFAULT_PLANS, timedelta(days=42), bootstrap)
    await again.start()
    try:
        assert await again.evaluate() == 0
    finally:
        await again.stop()
    assert len(await consume_all(bootstrap, settings.alerts_topic, 1)) == len(records)
    assert len(receiver.received()) == len(received)
    assert datetime.now(UTC) - stored[0].emitted_at < timedelta(minutes=10)


async def test_a_failure_between_publishing_and_recording_repeats_the_same_alert(
    store: Store,
    kafka_bootstrap: str,
    unique_name: str,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 3 (recording the alert) fails once, as a crash right after steps 1 and 2
    would leave things: the next evaluation publishes the same key again and makes no
    second delivery; the receiver sees one webhook-id."""
    settings = AlertSettings(
        data_dir=tmp_path,
        alerts_topic=f"{unique_name}.alerts",
        webhook_allow_private=True,
        webhook_retry_schedule_s="0.5",
    )
    AccountStore(store).create("acme", "free")
    alerts = AlertStore(store)
    endpoint = await admin.create(
        alerts, SecretBox.from_settings(settings), settings, WebhookCreateIn(url=receiver.url)
    )
    receiver.start(endpoint.secret, fail_s=0)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    write_wire(
        store,
        [
            ["acme", int(minute.timestamp()), REQUEST, "", "", "", 200, "", 1, 85 * 1_000_000,
             0.0, 0, 0, ms(minute), 0]
        ],
    )  # fmt: skip
    evaluator = AlertEvaluator(store, settings, DEFAULT_PLANS, timedelta(days=42), kafka_bootstrap)
    await evaluator.start()
    real = AlertStore.put_alerts
    failures = [RuntimeError("the store went away")]

    def flaky(self: AlertStore, rows: Any) -> None:
        if failures:
            raise failures.pop()
        real(self, rows)

    monkeypatch.setattr(AlertStore, "put_alerts", flaky)
    try:
        evaluator.touch(["acme"])
        assert await evaluator.evaluate() == 0, "the failed emission counted as done"
        assert alerts.alerts("acme") == []
        # The account was kept for another try: the crossing and the two projections.
        assert await evaluator.evaluate() == 3
        await _until("the delivery", lambda: any(r["status"] == 200 for r in receiver.received()))
        await asyncio.sleep(1.0)  # a second delivery would arrive by now
    finally:
        await evaluator.stop()
    (stored,) = [a for a in alerts.alerts("acme") if a.type == CROSSED]
    assert (stored.window, stored.threshold) == ("session", 80)
    records = [
        r for r in await consume_all(kafka_bootstrap, settings.alerts_topic, 1)
        if json.loads(r.value)["type"] == CROSSED
    ]  # fmt: skip
    assert [r.key.decode() for r in records] == [stored.id, stored.id]
    received = receiver.received()
    assert {r["id"] for r in received} == {delivery_id(stored.id, endpoint.id)}
    assert len(received) == 1
