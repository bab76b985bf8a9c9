"""The alert evaluator: finds crossings in what the sink wrote and emits each once.

Runs in the process that runs the sink (`tally up`, `tally sink`). The sink's
listener hands it the accounts of every INSERT that succeeded; a few times a
second the evaluator reads those accounts' usage back from the store (what the
sink applied, nothing else) and asks `rules.due` which alerts it calls for. An
alert it has not emitted yet is, in this order:

1. published to `tally.alerts` (compacted) keyed by its id, by an idempotent
   producer with acks=all, and awaited;
2. turned into one delivery per matching endpoint, each with the webhook-id
   derived from (alert id, endpoint id), written to `webhook_deliveries` unless
   a row with that id exists;
3. written to `alerts` (ReplacingMergeTree keyed by the id): from then on every
   evaluator knows it was emitted.

A crash between 1 and 3 leaves the alert unrecorded, so the next evaluation emits
it again under the same id, the same Kafka key and the same webhook-ids: a
duplicate a consumer recognises, never a second alert. On start the evaluator
re-evaluates every account active in the last week and the late grace, so a
crossing written just before a crash is still found (docs/alerts.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaProducer
from mode import Service

from deploy.kafka_local import ensure_topics
from query_api import queries
from query_api.alerts.dispatch import Dispatcher, utcnow
from query_api.alerts.rules import Alert, due, event_body
from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import SecretBox
from query_api.alerts.store import PENDING, AlertStore, Delivery, Endpoint
from query_api.plans import Plan
from query_api.queries import UsageReads
from query_api.usage import WEEK, history_start_any_anchor
from schemas.store import Store

if TYPE_CHECKING:
    from processors import Sink
    from query_api.view import UsageView
    from query_api.view_feed import ViewFeed

log = logging.getLogger("tally.alerts")

COMPACTED = {"cleanup.policy": "compact"}
# Events may be up to 5 minutes ahead of the clock (docs/api.md#validity).
AHEAD = timedelta(minutes=6)
PRUNE_EVERY = timedelta(minutes=10)


def delivery_id(alert_id: str, endpoint_id: str) -> str:
    """The webhook-id of an alert's delivery to an endpoint: derived, never drawn, so
    every attempt and every re-creation after a crash carries the same one."""
    return "msg_" + hashlib.sha256(f"{alert_id}\n{endpoint_id}".encode()).hexdigest()[:32]


def alert_row(alert: Alert, body: bytes, emitted_at: datetime, version: int) -> list[object]:
    return [
        alert.id, alert.type, alert.account, alert.plan, alert.window, alert.threshold,
        alert.used_percentage, alert.start, alert.resets_at, emitted_at, body.decode(), version,
    ]  # fmt: skip


class AlertEvaluator:
    def __init__(
        self,
        store: Store,
        settings: AlertSettings,
        plans: Mapping[str, Plan],
        history: timedelta,
        bootstrap: str | None,
        clock: Callable[[], datetime] = utcnow,
        view: UsageView | None = None,
    ) -> None:
        """`view`: the API's in-memory usage view in this process (`tally up`), read
        instead of the store whenever it covers the history (query_api/view.py)."""
        self.store = store
        self.view = view
        self.settings = settings
        self.plans = plans
        self.history = history
        self.bootstrap = bootstrap
        self.clock = clock
        self.alerts = AlertStore(store)
        self.dispatcher = Dispatcher(
            self.alerts, SecretBox.from_settings(settings), settings, clock
        )
        self.late = timedelta(seconds=settings.alerts_late_s)
        self.emitted_count = 0
        self._dirty: set[str] = set()
        # Alert ids known emitted, with their window's end: a window closed to alerts
        # (ended more than `late` ago) can raise none, so its ids are dropped.
        self._emitted: dict[str, datetime] = {}
        self._producer: AIOKafkaProducer | None = None
        self._pruned = clock()

    def on_applied(self, rows: Sequence[Sequence[Any]], _reflected: Mapping[int, int]) -> None:
        """The sink's listener: the accounts of an INSERT that succeeded."""
        self._dirty.update(str(row[0]) for row in rows if row[0])

    def touch(self, accounts: Sequence[str]) -> None:
        self._dirty.update(accounts)

    async def start(self) -> None:
        if self.bootstrap is not None:
            await ensure_topics(
                self.bootstrap,
                {self.settings.alerts_topic: 1},
                configs={self.settings.alerts_topic: COMPACTED},
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all"
            )
            await producer.start()
            self._producer = producer
        now = self.clock()
        open_since = now - self.late - WEEK
        self._emitted = await asyncio.to_thread(self.alerts.recent_ids, open_since)
        self._pruned = now
        # Whatever was applied before this start may hold a crossing not yet emitted.
        self.touch(await asyncio.to_thread(self.alerts.active_accounts, open_since))
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.evaluate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.settings.alerts_interval_s)

    async def evaluate(self) -> int:
        """Evaluate the accounts written since the last call; the number of alerts emitted.

        An account whose evaluation fails (store or Kafka away) is kept for the next call.
        """
        self._prune()
        accounts, self._dirty = sorted(self._dirty), set()
        emitted = 0
        for index, account in enumerate(accounts):
            try:
                emitted += await self._evaluate(account)
            except Exception as exc:
                log.error("alerts: could not evaluate %s (%s); retrying", account, exc)
                self._dirty.update(accounts[index:])
                break
        return emitted

    def _prune(self) -> None:
        now = self.clock()
        if now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        closed = now - self.late
        self._emitted = {i: end for i, end in self._emitted.items() if end > closed}

    async def _evaluate(self, account: str) -> int:
        now = self.clock()
        # Off the event loop: in `tally up` the loop also serves the API and the sink.
        found = await asyncio.to_thread(self._read_and_judge, account, now)
        fresh = [a for a in found if a.id not in self._emitted]
        if not fresh:
            return 0
        known = await asyncio.to_thread(self.alerts.known, [a.id for a in fresh])
        self._emitted.update((a.id, a.resets_at) for a in fresh if a.id in known)
        fresh = [a for a in fresh if a.id not in known]
        if fresh:
            await self._emit(fresh, now)
        return len(fresh)

    def _read_and_judge(self, account: str, now: datetime) -> list[Alert]:
        since = history_start_any_anchor(now, self.history)
        view = self.view
        reads = None
        if view is not None and view.covers(since, now):
            # In memory and exact (the feed calls on_applied after the view applied
            # the rows); usage_reads holds the view's lock, so a thread may call it.
            # None for an account evicted past TALLY_API_VIEW_MAX_ROWS.
            reads = view.usage_reads(account, since, now + AHEAD, now)
        if reads is None:
            # One statement for the account's row and its minutes; the topic only
            # names freshness markers, which alerts do not use.
            reads = queries.usage_reads(self.store, account, since, now + AHEAD, now, "")
        return self.due(account, reads, now)

    def due(self, account: str, reads: UsageReads, now: datetime) -> list[Alert]:
        """The alerts the account's usage calls for at `now`."""
        if reads.account is None:
            return []  # usage of an account nobody created: no plan, so no limit
        plan_name = reads.account[0]
        plan = self.plans.get(plan_name)
        if plan is None:
            log.error("alerts: account %s has unknown plan %r", account, plan_name)
            return []
        return due(account, reads.minutes, plan, now, self.late)

    async def _emit(self, alerts: list[Alert], now: datetime) -> None:
        bodies = [orjson.dumps(event_body(a, now)) for a in alerts]
        if self._producer is not None:
            sent = [
                await self._producer.send(self.settings.alerts_topic, body, key=a.id.encode())
                for a, body in zip(alerts, bodies, strict=True)
            ]
            await asyncio.gather(*sent)
        endpoints = await self.dispatcher.refresh_endpoints()
        deliveries = _deliveries(alerts, bodies, endpoints, now)
        existing = await asyncio.to_thread(
            self.alerts.existing_deliveries, [d.id for d in deliveries]
        )
        deliveries = [d for d in deliveries if d.id not in existing]
        await asyncio.to_thread(self.alerts.put_deliveries, deliveries)
        # Handed over now: if recording the alert fails below, the next evaluation finds
        # these deliveries written and does not make them again.
        self.dispatcher.submit(deliveries)
        version = int(now.timestamp() * 1e9)
        rows = [alert_row(a, b, now, version) for a, b in zip(alerts, bodies, strict=True)]
        await asyncio.to_thread(self.alerts.put_alerts, rows)
        self._emitted.update((a.id, a.resets_at) for a in alerts)
        self.emitted_count += len(alerts)
        for alert in alerts:
            log.info(
                "alerts: %s %s %s %d%% (%s)",
                alert.type,
                alert.account,
                alert.window,
                alert.threshold,
                alert.id,
            )


def _deliveries(
    alerts: Sequence[Alert], bodies: Sequence[bytes], endpoints: Sequence[Endpoint], now: datetime
) -> list[Delivery]:
    return [
        Delivery(
            delivery_id(alert.id, endpoint.id),
            endpoint.id,
            alert.id,
            alert.type,
            body.decode(),
            PENDING,
            0,
            now,
            0,
            now,
        )
        for alert, body in zip(alerts, bodies, strict=True)
        for endpoint in endpoints
        if endpoint.wants(alert.type, alert.account)
    ]


class AlertService(Service):
    """The evaluator and its dispatcher as a mode Service beside the sink."""

    def __init__(self, evaluator: AlertEvaluator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluator = evaluator
        self._stopping = asyncio.Event()

    async def on_start(self) -> None:
        await self.evaluator.start()

    @Service.task
    async def _evaluate(self) -> None:
        await self.evaluator.run(self._stopping)

    async def on_stop(self) -> None:
        self._stopping.set()
        await self.evaluator.stop()


def attach_alerts(
    sink: Sink, store: Store, bootstrap: str, feed: ViewFeed | None = None
) -> AlertService | None:
    """The alert service for a process that runs `sink` (None: TALLY_ALERTS_ENABLED=false).

    Plans and the history read come from the API's settings (TALLY_PLANS,
    TALLY_WINDOW_HISTORY_DAYS), so alerts and the usage endpoints agree.
    """
    from query_api.plans import load_plans
    from query_api.settings import ApiSettings
    from schemas.settings import load

    settings = load(AlertSettings)
    if not settings.alerts_enabled:
        return None
    api = load(ApiSettings)
    evaluator = AlertEvaluator(
        store,
        settings,
        load_plans(api.plans),
        timedelta(days=api.window_history_days),
        bootstrap,
        view=None if feed is None else feed.view,
    )
    if feed is not None:
        # Told by the feed once the view holds the rows it reads back.
        feed.add_listener(evaluator.on_applied)
    else:
        # Told by the sink once the store holds them.
        sink.add_listener(evaluator.on_applied)
    return AlertService(evaluator)
