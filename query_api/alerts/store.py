"""The alerts' and webhooks' rows in the store (blocking; call via asyncio.to_thread).

Tables of migration 0003. Every table but the attempt log is a
ReplacingMergeTree read with FINAL, so a row written twice (a re-evaluation after
a restart, a delivery's next attempt) is one logical row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.rollup_table import MARKER_ACCOUNT
from schemas.store import Store

ALERT_COLUMNS = (
    "id", "type", "account", "plan", "window", "threshold", "used_percentage",
    "window_start", "resets_at", "emitted_at", "body", "version",
)  # fmt: skip
DELIVERY_COLUMNS = (
    "id", "endpoint_id", "alert_id", "event_type", "body", "status", "attempts",
    "next_attempt_at", "last_status_code", "created_at", "version",
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "endpoint_id", "delivery_id", "attempt", "at", "status_code", "latency_ms", "error",
)  # fmt: skip

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True, slots=True)
class StoredAlert:
    id: str
    type: str
    account: str
    window: str
    threshold: int
    used_percentage: float
    window_start: datetime
    resets_at: datetime
    emitted_at: datetime


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]
    account: str | None
    sealed_secret: str
    created_at: datetime

    def wants(self, event_type: str, account: str) -> bool:
        return event_type in self.events and self.account in (None, account)


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    """The webhook-id: the same on every attempt."""
    endpoint_id: str
    alert_id: str
    event_type: str
    body: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Attempt:
    endpoint_id: str
    delivery_id: str
    attempt: int
    at: datetime
    status_code: int
    """0: no HTTP answer (timeout, refused, unsafe target)."""
    latency_ms: float
    error: str


def version() -> int:
    return time.time_ns()


class AlertStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- alerts -------------------------------------------------------------------

    def known(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = self.store.query(
            "SELECT DISTINCT id FROM alerts WHERE id IN {ids:Array(String)}", {"ids": list(ids)}
        )
        return {str(r[0]) for r in rows}

    def recent_ids(self, since: datetime) -> dict[str, datetime]:
        """Ids of the alerts whose window ended at or after `since`, with that end."""
        rows = self.store.query(
            "SELECT id, max(resets_at) FROM alerts WHERE resets_at >= {s:DateTime64(3)}"
            " GROUP BY id",
            {"s": since},
        )
        return {str(i): _plain(end) for i, end in rows}  # type: ignore[misc]

    def put_alerts(self, rows: Iterable[Sequence[object]]) -> None:
        batch = [list(r) for r in rows]
        if batch:
            self.store.insert("alerts", batch, ALERT_COLUMNS)

    def alerts(self, account: str | None, limit: int = 100) -> list[StoredAlert]:
        rows = self.store.query(
            "SELECT id, type, account, window, threshold, used_percentage, window_start,"
            " resets_at, emitted_at FROM alerts FINAL"
            " WHERE {all:Bool} OR account = {a:String} ORDER BY emitted_at DESC LIMIT {n:UInt32}",
            {"all": account is None, "a": account or "", "n": limit},
        )
        return [
            StoredAlert(str(i), str(t), str(a), str(w), int(th), float(p), s, r, e)
            for i, t, a, w, th, p, s, r, e in rows
        ]

    # -- endpoints ----------------------------------------------------------------

    def put_endpoint(self, endpoint: Endpoint, deleted: bool = False) -> None:
        self.store.insert(
            "webhook_endpoints",
            [
                [
                    endpoint.id,
                    endpoint.url,
                    list(endpoint.events),
                    endpoint.account,
                    endpoint.sealed_secret,
                    endpoint.created_at,
                    deleted,
                    version(),
                ]
            ],
            ("id", "url", "events", "account", "secret", "created_at", "deleted", "version"),
        )

    def endpoints(self) -> list[Endpoint]:
        rows = self.store.query(
            "SELECT id, url, events, account, secret, created_at FROM webhook_endpoints FINAL"
            " WHERE NOT deleted ORDER BY created_at, id"
        )
        return [Endpoint(str(i), str(u), tuple(e), a, str(s), c) for i, u, e, a, s, c in rows]

    def endpoint(self, endpoint_id: str) -> Endpoint | None:
        return next((e for e in self.endpoints() if e.id == endpoint_id), None)

    # -- deliveries ---------------------------------------------------------------

    def put_deliveries(self, deliveries: Iterable[Delivery]) -> None:
        rows = [
            [
                d.id,
                d.endpoint_id,
                d.alert_id,
                d.event_type,
                d.body,
                d.status,
                d.attempts,
                d.next_attempt_at,
                d.last_status_code,
                d.created_at,
                version(),
            ]
            for d in deliveries
        ]
        if rows:
            self.store.insert("webhook_deliveries", rows, DELIVERY_COLUMNS)

    def existing_deliveries(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = self.store.query(
            "SELECT DISTINCT id FROM webhook_deliveries WHERE id IN {ids:Array(String)}",
            {"ids": list(ids)},
        )
        return {str(r[0]) for r in rows}

    def deliveries(
        self, endpoint_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        rows = self.store.query(
            f"SELECT {', '.join(DELIVERY_COLUMNS[:-1])} FROM webhook_deliveries FINAL"
            " WHERE ({any_e:Bool} OR endpoint_id = {e:String})"
            " AND ({any_s:Bool} OR status = {s:String})"
            " ORDER BY created_at DESC, id LIMIT {n:UInt32}",
            {
                "any_e": endpoint_id is None,
                "e": endpoint_id or "",
                "any_s": status is None,
                "s": status or "",
                "n": limit,
            },
        )
        return [Delivery(*(_plain(v) for v in row)) for row in rows]  # type: ignore[arg-type]

    def log_attempt(self, attempt: Attempt) -> None:
        a = attempt
        self.store.insert(
            "webhook_attempts",
            [
                [
                    a.endpoint_id,
                    a.delivery_id,
                    a.attempt,
                    a.at,
                    a.status_code,
                    a.latency_ms,
                    a.error,
                ]
            ],
            ATTEMPT_COLUMNS,
        )

    def attempts(self, endpoint_id: str, limit: int = 200) -> list[Attempt]:
        rows = self.store.query(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM webhook_attempts"
            " WHERE endpoint_id = {e:String} ORDER BY at DESC LIMIT {n:UInt32}",
            {"e": endpoint_id, "n": limit},
        )
        return [Attempt(*(_plain(v) for v in row)) for row in rows]  # type: ignore[arg-type]

    def active_accounts(self, since: datetime) -> list[str]:
        rows = self.store.query(
            "SELECT DISTINCT account FROM rollup_minute"
            " WHERE minute >= {s:DateTime} AND account != {marker_account:String}",
            {"s": since, "marker_account": MARKER_ACCOUNT},
        )
        return sorted(str(r[0]) for r in rows)


def _plain(value: object) -> object:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
