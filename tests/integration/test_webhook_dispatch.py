"""The dispatcher (query_api/alerts/dispatch.py) on a real store and real sockets: one
endpoint that never answers delays no other, failures are retried on the schedule
under the same webhook-id, and a restarted dispatcher resumes pending deliveries."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.processes import free_port
from query_api.alerts.dispatch import Dispatcher, Outcome, next_state
from query_api.alerts.settings import STANDARD_SCHEDULE, AlertSettings
from query_api.alerts.signing import SecretBox, new_secret
from query_api.alerts.store import DELIVERED, FAILED, PENDING, AlertStore, Delivery, Endpoint
from schemas.store import Store
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A URL whose server accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", free_port()))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        server.close()


def _endpoint(alerts: AlertStore, box: SecretBox, name: str, url: str, secret: str) -> Endpoint:
    endpoint = Endpoint(
        name, url, ("usage.threshold.crossed",), None, box.seal(name, secret), datetime.now(UTC)
    )
    alerts.put_endpoint(endpoint)
    return endpoint


def _delivery(endpoint: Endpoint, msg_id: str) -> Delivery:
    now = datetime.now(UTC)
    body = '{"type":"usage.threshold.crossed","data":{}}'
    return Delivery(msg_id, endpoint.id, "alrt_x", "usage.threshold.crossed", body, PENDING,
                    0, now, 0, now)  # fmt: skip


async def test_a_silent_endpoint_delays_no_other_and_retries_keep_the_id(
    store: Store, tmp_path: Path, black_hole: str, receiver: Receiver
) -> None:
    settings = AlertSettings(
        data_dir=tmp_path,
        webhook_allow_private=True,
        webhook_timeout_s=4,
        webhook_retry_schedule_s="0.6,0.6",
    )
    alerts = AlertStore(store)
    box = SecretBox.from_settings(settings)
    secret = new_secret()
    silent = _endpoint(alerts, box, "whep_silent", black_hole, new_secret())
    good = _endpoint(alerts, box, "whep_good", receiver.url, secret)
    receiver.start(secret, fail_s=0.3)  # the first attempt gets a 500
    dispatcher = Dispatcher(alerts, box, settings)
    await dispatcher.start()
    try:
        started = time.monotonic()
        made = [_delivery(silent, "msg_silent"), _delivery(good, "msg_good")]
        alerts.put_deliveries(made)  # as the evaluator does before handing them over
        dispatcher.submit(made)
        while not [r for r in receiver.received() if r["status"] == 200]:
            assert time.monotonic() - started < 3.5, "the good endpoint waited on the silent one"
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        # Stopping cancels an attempt whose outcome is not written yet (it would be sent
        # again after a restart, under the same id): wait until it is.
        while alerts.deliveries("whep_good")[0].status != DELIVERED:
            assert time.monotonic() - started < 10, "the delivered attempt was never recorded"
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop()
    received = receiver.received()
    assert [r["status"] for r in received] == [500, 200]
    assert {r["id"] for r in received} == {"msg_good"}
    assert all(r["verified"] for r in received)
    assert took < settings.webhook_timeout_s
    (stored,) = alerts.deliveries("whep_good")
    assert (stored.status, stored.attempts, stored.last_status_code) == (DELIVERED, 2, 200)
    assert [a.status_code for a in alerts.attempts("whep_good")] == [200, 500]

    # The silent endpoint's delivery is still pending (its first attempt was cut off by
    # stop()); a new dispatcher takes it up and fails it after the schedule.
    settings = settings.model_copy(update={"webhook_timeout_s": 0.5})
    again = Dispatcher(alerts, box, settings)
    await again.start()
    try:
        deadline = time.monotonic() + 20
        while alerts.deliveries("whep_silent")[0].status != FAILED:
            assert time.monotonic() < deadline, "the silent endpoint's delivery never failed"
            await asyncio.sleep(0.1)
    finally:
        await again.stop()
    log = alerts.attempts("whep_silent")
    assert [a.status_code for a in log] == [0, 0, 0]
    assert {a.delivery_id for a in log} == {"msg_silent"}
    assert all("Timeout" in a.error for a in log)


def test_the_default_schedule_spans_more_than_a_day() -> None:
    delays = AlertSettings(webhook_retry_schedule_s=STANDARD_SCHEDULE).retry_delays
    assert sum(delays) >= 24 * 3600
    assert list(delays) == sorted(delays)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    delivery = _delivery(Endpoint("e", "u", (), None, "", now), "msg_1")
    for attempt, delay in enumerate(delays, start=1):
        delivery = next_state(delivery, Outcome(503, 1.0, ""), delays, now)
        assert delivery.status == PENDING
        assert delivery.attempts == attempt
        assert (delivery.next_attempt_at - now).total_seconds() == delay
    delivery = next_state(delivery, Outcome(503, 1.0, ""), delays, now)
    assert (delivery.status, delivery.attempts) == (FAILED, len(delays) + 1)
    assert next_state(delivery, Outcome(204, 1.0, ""), delays, now).status == DELIVERED
