"""Webhook deliveries: at least once, same webhook-id on every attempt (docs/alerts.md).

Each endpoint has a task of its own working through its pending deliveries, so a
slow or failing endpoint never delays another: its attempts wait on its own
timeouts and its own retry delays. A delivery is retried after each failure (a
non-2xx answer, a timeout, a refused connection) with the delays of
TALLY_WEBHOOK_RETRY_SCHEDULE_S, then marked `failed`. Every attempt is logged
(status code, latency) and the delivery's state is written after it, so a
restarted dispatcher picks pending deliveries up where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import httpx
from cryptography.exceptions import InvalidTag

from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox, UnsafeUrlError, check_target, headers
from query_api.alerts.store import (
    DELIVERED,
    FAILED,
    PENDING,
    AlertStore,
    Attempt,
    Delivery,
    Endpoint,
)

log = logging.getLogger("tally.webhooks")

ENDPOINTS_TTL_S = 5.0
STORE_RETRY_S = 5.0
UNREADABLE_SECRET = (
    "cannot decrypt the endpoint's signing secret: this process has another key than "
    "the API that created it; give the API and every sink the same TALLY_WEBHOOK_SECRET_KEY"
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int
    """0: no HTTP answer."""
    latency_ms: float
    error: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


async def post(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    msg_id: str,
    body: bytes,
    allow_private: bool,
    now: datetime,
) -> Outcome:
    """One signed attempt; never raises for what the target does."""
    started = time.perf_counter()
    try:
        await check_target(url, allow_private)
        sent = headers(secret, msg_id, int(now.timestamp()), body)
        response = await client.post(url, content=body, headers=sent)
    except UnsafeUrlError as exc:
        return Outcome(0, 0.0, f"refused: {exc}")
    except httpx.HTTPError as exc:
        elapsed = (time.perf_counter() - started) * 1000
        return Outcome(0, elapsed, f"{type(exc).__name__}: {exc}"[:500])
    elapsed = (time.perf_counter() - started) * 1000
    return Outcome(response.status_code, elapsed, "")


def next_state(
    delivery: Delivery, outcome: Outcome, delays: tuple[float, ...], now: datetime
) -> Delivery:
    """The delivery after one more attempt: delivered, retried later, or failed."""
    attempts = delivery.attempts + 1
    if outcome.ok:
        status, due = DELIVERED, delivery.next_attempt_at
    elif attempts <= len(delays):
        status, due = PENDING, now + timedelta(seconds=delays[attempts - 1])
    else:
        status, due = FAILED, delivery.next_attempt_at
    return replace(
        delivery,
        status=status,
        attempts=attempts,
        next_attempt_at=due,
        last_status_code=outcome.status_code,
    )


class Dispatcher:
    def __init__(
        self,
        alerts: AlertStore,
        box: SecretBox,
        settings: AlertSettings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.alerts = alerts
        self.box = box
        self.settings = settings
        self.clock = clock
        self.delays = settings.retry_delays
        self._queues: dict[str, dict[str, Delivery]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._endpoints_read = 0.0
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )
        await self.refresh_endpoints()
        pending = await asyncio.to_thread(self.alerts.deliveries, None, PENDING, 1_000_000)
        self.submit(pending)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()

    async def refresh_endpoints(self) -> list[Endpoint]:
        found = await asyncio.to_thread(self.alerts.endpoints)
        self._endpoints = {e.id: e for e in found}
        self._endpoints_read = time.monotonic()
        return found

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.status != PENDING:
                continue
            queue = self._queues.setdefault(delivery.endpoint_id, {})
            queue[delivery.id] = delivery
            self._wake.setdefault(delivery.endpoint_id, asyncio.Event()).set()
            task = self._tasks.get(delivery.endpoint_id)
            if task is None or task.done():
                self._tasks[delivery.endpoint_id] = asyncio.create_task(
                    self._serve(delivery.endpoint_id), name=f"webhooks-{delivery.endpoint_id}"
                )

    async def _serve(self, endpoint_id: str) -> None:
        """Deliver one endpoint's due deliveries, then sleep until the next is due."""
        queue = self._queues[endpoint_id]
        wake = self._wake[endpoint_id]
        while queue:
            wake.clear()
            now = self.clock()
            for delivery in sorted(queue.values(), key=lambda d: (d.next_attempt_at, d.id)):
                if delivery.next_attempt_at <= now:
                    try:
                        updated = await self._attempt(delivery)
                    except Exception as exc:  # the store away: try again, not counted
                        log.error("webhooks: attempt of %s failed (%s)", delivery.id, exc)
                        later = self.clock() + timedelta(seconds=STORE_RETRY_S)
                        updated = replace(delivery, next_attempt_at=later)
                    if updated.status == PENDING:
                        queue[delivery.id] = updated
                    else:
                        queue.pop(delivery.id, None)
            if not queue:
                break
            due = min(d.next_attempt_at for d in queue.values())
            wait = max((due - self.clock()).total_seconds(), 0.0)
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=wait)

    async def _attempt(self, delivery: Delivery) -> Delivery:
        # Endpoints are changed by the admin API, maybe in another process: an
        # attempt sees a deletion or a new URL within ENDPOINTS_TTL_S.
        if time.monotonic() - self._endpoints_read > ENDPOINTS_TTL_S:
            await self.refresh_endpoints()
        endpoint = self._endpoints.get(delivery.endpoint_id)
        now = self.clock()
        if endpoint is None:
            outcome = Outcome(0, 0.0, "the endpoint was deleted")
            updated = replace(delivery, status=FAILED, attempts=delivery.attempts + 1)
        else:
            assert self._client is not None, "start() the dispatcher first"
            try:
                secret = self.box.open(endpoint.id, endpoint.sealed_secret)
            except InvalidTag:
                secret = None
            if secret is None:
                outcome = Outcome(0, 0.0, UNREADABLE_SECRET)
            else:
                outcome = await post(
                    self._client,
                    endpoint.url,
                    secret,
                    delivery.id,
                    delivery.body.encode(),
                    self.settings.webhook_allow_private,
                    now,
                )
            updated = next_state(delivery, outcome, self.delays, self.clock())
        attempt = Attempt(
            delivery.endpoint_id,
            delivery.id,
            updated.attempts,
            now,
            outcome.status_code,
            round(outcome.latency_ms, 3),
            outcome.error,
        )
        try:
            await asyncio.to_thread(self._record, attempt, updated)
        except Exception as exc:  # the attempt happened; a restart re-sends under the same id
            log.error("webhooks: could not record delivery %s (%s)", delivery.id, exc)
        if not outcome.ok:
            log.info(
                "webhooks: %s to %s failed (%s); %s",
                delivery.id,
                delivery.endpoint_id,
                outcome.error or outcome.status_code,
                updated.status,
            )
        return updated

    def _record(self, attempt: Attempt, delivery: Delivery) -> None:
        self.alerts.log_attempt(attempt)
        self.alerts.put_deliveries([delivery])
