"""Keeping the gateway's decision state current from Tally (producers/enforcement.py).

`Enforcement` owns an `Enforcer` and one task per event loop that, every
`enforce_sync_interval_s`, posts the accounts this gateway saw recently to
`POST /api/v1/admin/limits` (1000 per request) and applies the answers. A request of
an account the gateway has never synced wakes the task at once: that account's calls
are allowed (fail open, counted as `unsynced_allowed`) until its first answer arrives,
one API round trip later, and its uses since are counted locally meanwhile, so the
first answer plus them is exact.

Which of its own requests Tally's counts already hold is judged per partition: the sync
sends the events topic's partition count (`partitions`, from the `Gateway` the middleware
records to, once it has started), and Tally answers, per account, the time up to which
the partition that account's events go to is counted (`partition_reflected_until`, in the
same snapshot as the counts). Without a count (another recorder, or before the gateway
connected) the least over all partitions is used, which is safe but keeps every
account's requests local while any one partition lags.

No request waits for the API. When it fails (unreachable, 5xx, timeout), the failure
is logged (at most once per 10 s) and counted in `stats.sync_failures`; accounts keep
their last answer until it is `enforce_stale_after_s` old, then are allowed (fail open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

import httpx

from producers.enforcement import Enforcer, Quota, Synced
from producers.settings import EnforcementSettings

log = logging.getLogger(__name__)

LIMITS_PATH: Final = "/api/v1/admin/limits"
BATCH: Final = 1000
"""The route's most accounts per request."""


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _quota(body: Mapping[str, Any]) -> Quota:
    return Quota(int(body["used_micro"]), float(body["limit_units"]), _epoch(body["resets_at"]))


def account_reflected(body: Mapping[str, Any]) -> float | None:
    """Up to when (epoch s) the account's OWN events are in its counts: its partition's
    time when Tally named the partition (None there means nothing of that partition is
    counted yet, never "fall back to the others"); else the least over partitions."""
    if body.get("partition") is not None:
        return _epoch(body.get("partition_reflected_until"))
    return _epoch(body.get("reflected_until"))


def parse_account(body: Mapping[str, Any] | None) -> Synced | None:
    """One account of the limits answer (query_api/routes/limits.py) as the core needs it."""
    if body is None:
        return None
    minute = body["minute"]
    start = _epoch(minute["start"])
    assert start is not None
    return Synced(
        per_minute=int(minute["per_minute"]),
        minute_start=start,
        minute_requests=int(minute["requests"]),
        session=_quota(body["session"]),
        weekly=_quota(body["weekly"]),
        active_streams=int(body["streams"]["active"]),
        max_streams=int(body["streams"]["max"]),
        reflected_until=account_reflected(body),
    )


class Enforcement:
    """The enforcer and its sync task; pass it to MeteringMiddleware(enforcement=...)."""

    def __init__(
        self,
        api_url: str,
        admin_key: str,
        *,
        sync_interval_s: float = 1.0,
        active_within_s: float = 300.0,
        stale_after_s: float = 10.0,
        margin_s: float = 2.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = Enforcer(margin_s=margin_s, stale_after_s=stale_after_s)
        self.stats = self.core.stats
        self.clock = clock
        self._url = api_url.rstrip("/") + LIMITS_PATH
        self._headers = {"Authorization": f"Bearer {admin_key}"}
        self._interval_s = sync_interval_s
        self._active_within_s = active_within_s
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._last_report = -1e9
        self.partitions: Callable[[], int] | None = None
        """The events topic's partition count (0: not known yet); None: never known."""

    def learn_partitions_from(self, recorder: object) -> None:
        """Ask `recorder` (a `Gateway`: its `partitions`, known once started) for the
        partition count, unless one was set: its events went to those partitions."""
        if self.partitions is None and isinstance(getattr(recorder, "partitions", None), int):
            self.partitions = lambda: int(getattr(recorder, "partitions", 0))

    @classmethod
    def from_settings(cls, settings: EnforcementSettings | None = None) -> Enforcement:
        s = settings or EnforcementSettings()
        if not s.enforce_api_url or s.enforce_admin_key is None:
            raise ValueError(
                "enforcement needs TALLY_ENFORCE_API_URL (Tally's API) and "
                "TALLY_ENFORCE_ADMIN_KEY (an admin key of it); set both, or do not pass "
                "enforcement= to MeteringMiddleware"
            )
        return cls(
            s.enforce_api_url,
            s.enforce_admin_key.get_secret_value(),
            sync_interval_s=s.enforce_sync_interval_s,
            active_within_s=s.enforce_active_within_s,
            stale_after_s=s.enforce_stale_after_s,
            margin_s=s.enforce_reflect_margin_s,
            timeout_s=s.enforce_timeout_s,
        )

    def ensure_running(self) -> None:
        """Start the sync task on the running loop if it is not running (cheap)."""
        task = self._task
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(self._wake), name="tally-enforcement-sync")

    def wake(self) -> None:
        """Sync now (a new account was seen)."""
        if self._wake is not None:
            self._wake.set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, wake: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=self._timeout_s) as client:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await wake.wait()
                wake.clear()
                await self.sync_once(client)

    async def sync_once(self, client: httpx.AsyncClient) -> None:
        """Read and apply the limits of every recently active account; never raises."""
        accounts = self.core.active(self.clock() - self._active_within_s)
        partitions = self.partitions() if self.partitions is not None else 0
        for i in range(0, len(accounts), BATCH):
            body: dict[str, object] = {"accounts": accounts[i : i + BATCH]}
            if partitions > 0:
                body["partitions"] = partitions
            started = time.monotonic()
            try:
                response = await client.post(self._url, json=body, headers=self._headers)
                response.raise_for_status()
                took = time.monotonic() - started
                self.stats.sync_seconds_max = max(self.stats.sync_seconds_max, took)
                answers = response.json()["accounts"]
                now = self.clock()
                for account in accounts[i : i + BATCH]:
                    self.core.apply(account, parse_account(answers.get(account)), now)
            except Exception as exc:
                self.stats.sync_failures += 1
                self._report(exc)
                return

    def _report(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_report < 10:
            return
        self._last_report = now
        log.error(
            "enforcement: could not read limits from %s (%s: %s); allowing calls of accounts "
            "whose last answer is older than the stale limit (fail open). Is the API up and "
            "TALLY_ENFORCE_ADMIN_KEY an admin key?",
            self._url,
            type(exc).__name__,
            exc,
        )
