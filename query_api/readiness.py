"""Whether the stack is counting (/readyz): decided cheaply, answered generically.

What proves it: an idle worker commits a heartbeat per partition every flush
interval (processors/app.py), and the sink stores it as that partition's marker.
A marker younger than TALLY_PROCESSORS_STALE_S therefore proves the whole chain
(Kafka, a worker, the sink, the store) without a single event ever sent. When it
is older, three more signals say which link broke: whether the store and Kafka
answer, whether the workers' consumer group has members, and the sink's own write
time (its rollups markers carry it, and an idle sink re-states them,
processors/sink.py).

The public answer names the first broken link with a stable code (`Reason`);
what the store or Kafka actually said goes to the log only, once per change.
Each check is one store query and one group description; at most one check runs
per TALLY_READYZ_REFRESH_S, however many callers ask: they get the last verdict,
and a caller finding it older than that starts the next check in the background.
Only the first caller of a process waits (for the first check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from aiokafka.admin import AIOKafkaAdminClient

from query_api import queries
from query_api.settings import ApiSettings
from schemas.store import Store

log = logging.getLogger("tally.api.readiness")

CHECK_TIMEOUT_S = 5.0
"""A dependency slower than this to answer counts as unreachable."""

WARN_AFTER_S = 10.0
"""A stack that was ready and has not been for this long is worth a WARNING."""


class Reason(StrEnum):
    """Why the stack is not ready: the first broken link, in the order checked."""

    STORE_UNREACHABLE = "store_unreachable"
    KAFKA_UNREACHABLE = "kafka_unreachable"
    NO_WORKER = "no_worker"
    """The workers' consumer group (TALLY_CONSUMER_GROUP) has no member."""
    NO_SINK = "no_sink"
    """Workers run, but no sink has written to the store within TALLY_PROCESSORS_STALE_S."""
    PROCESSORS_BEHIND = "processors_behind"
    """Workers and the sink run, but some partition's counting is older than
    TALLY_PROCESSORS_STALE_S: a partition lags (or its worker is stuck)."""


OK = "ok"
UNKNOWN = "unknown"
"""A check that was not decided because an earlier link is broken."""


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: Reason | None
    """None: ready."""
    checks: dict[str, str]
    """Per link ("store", "kafka", "workers", "sink", "processors"): "ok", the
    Reason code, or "unknown"."""
    detail: str = ""
    """What went wrong, for the log (never in the public answer)."""

    @property
    def ready(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class Observed:
    """One round of raw signals; each failure is its exception text."""

    marks: queries.PipelineMarks | None
    store_error: str | None
    members: int | None
    kafka_error: str | None
    now: datetime


def judge(seen: Observed, stale_s: float) -> Verdict:
    """The verdict from one round of signals (pure: unit-tested alone)."""
    checks = dict.fromkeys(("store", "kafka", "workers", "sink", "processors"), UNKNOWN)
    if seen.store_error is not None or seen.marks is None:
        checks["store"] = Reason.STORE_UNREACHABLE
        return Verdict(Reason.STORE_UNREACHABLE, checks, f"store: {seen.store_error}")
    checks["store"] = OK
    if seen.kafka_error is not None or seen.members is None:
        checks["kafka"] = Reason.KAFKA_UNREACHABLE
        return Verdict(Reason.KAFKA_UNREACHABLE, checks, f"kafka: {seen.kafka_error}")
    checks["kafka"] = OK
    if seen.members == 0:
        checks["workers"] = Reason.NO_WORKER
        return Verdict(Reason.NO_WORKER, checks, "the workers' consumer group has no member")
    checks["workers"] = OK

    def age(at: datetime | None) -> float | None:
        return None if at is None else (seen.now - at).total_seconds()

    reflected = age(seen.marks.reflected_until)
    if reflected is not None and reflected <= stale_s:
        checks["sink"] = checks["processors"] = OK
        return Verdict(None, checks)
    wrote = age(seen.marks.sink_wrote)
    if wrote is None or wrote > stale_s:
        checks["sink"] = Reason.NO_SINK
        last = "never" if wrote is None else f"{wrote:.1f}s ago"
        return Verdict(Reason.NO_SINK, checks, f"the sink last wrote to the store {last}")
    checks["sink"] = OK
    checks["processors"] = Reason.PROCESSORS_BEHIND
    counted = "nothing yet" if reflected is None else f"up to {reflected:.1f}s ago"
    return Verdict(Reason.PROCESSORS_BEHIND, checks, f"the store reflects events {counted}")


async def group_members(bootstrap: str, group: str, timeout_s: float) -> int:
    """Members of the consumer group; raises when Kafka does not answer."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="tally-readyz",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            responses = await admin.describe_consumer_groups([group])
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    # Each group is (error_code, group, state, protocol_type, protocol, members, ...);
    # a group that never existed is described with no members.
    return sum(len(described[5]) for response in responses for described in response.groups)


@dataclass
class Readiness:
    """The cached verdict and the one check that may be running (see the module)."""

    settings: ApiSettings
    store: Store
    now: Callable[[], datetime]
    clock: Callable[[], float] = time.monotonic
    _verdict: Verdict | None = None
    _checked_at: float = 0.0
    _not_ready_since: float | None = None
    _was_ready: bool = False
    _warned: Reason | None = None
    _checking: asyncio.Task[Verdict] | None = field(default=None, repr=False)

    async def verdict(self) -> Verdict:
        """The last verdict, starting a fresh check when it is older than the interval."""
        due = self.clock() - self._checked_at >= self.settings.readyz_refresh_s
        if self._checking is None and (self._verdict is None or due):
            self._checking = asyncio.create_task(self._check())
        if self._verdict is None:
            assert self._checking is not None
            # Shielded: a caller that gives up must not cancel the shared check.
            return await asyncio.shield(self._checking)
        return self._verdict

    async def _check(self) -> Verdict:
        try:
            seen = await self._observe()
            verdict = judge(seen, self.settings.processors_stale_s)
            self._log(verdict)
            self._verdict = verdict
            self._checked_at = self.clock()
            return verdict
        finally:
            self._checking = None

    async def _observe(self) -> Observed:
        s = self.settings

        async def marks() -> queries.PipelineMarks:
            return await asyncio.to_thread(
                queries.pipeline_marks, self.store, s.events_topic, s.rollups_topic
            )

        store, kafka = await asyncio.gather(
            asyncio.wait_for(marks(), CHECK_TIMEOUT_S),
            group_members(s.bootstrap, s.consumer_group, CHECK_TIMEOUT_S),
            return_exceptions=True,
        )
        return Observed(
            marks=None if isinstance(store, BaseException) else store,
            store_error=_error(store),
            members=None if isinstance(kafka, BaseException) else kafka,
            kafka_error=_error(kafka),
            now=self.now(),
        )

    def _log(self, verdict: Verdict) -> None:
        """One INFO line per change of verdict; a WARNING once not ready for long.

        Short spells of not ready are part of normal operation: starting up, a
        rebalance, `tally up` stopping (its worker leaves the group first). A WARNING
        says the spell lasted WARN_AFTER_S (TALLY_PROCESSORS_STALE_S while the stack
        has never been ready), once per spell and reason, as seen by the checks that
        callers of /readyz cause.
        """
        previous = self._verdict
        now = self.clock()
        if verdict.ready:
            if previous is None or not previous.ready:
                log.info("ready: the store, Kafka, the workers and the sink all report")
            self._was_ready = True
            self._not_ready_since = None
            self._warned = None
            return
        assert verdict.reason is not None
        advice = _ADVICE[verdict.reason]
        if previous is None or previous.reason != verdict.reason:
            log.info("not ready (%s): %s; %s", verdict.reason, verdict.detail, advice)
        if self._not_ready_since is None:
            self._not_ready_since = now
        spell = now - self._not_ready_since
        patience = WARN_AFTER_S if self._was_ready else self.settings.processors_stale_s
        if spell >= patience and self._warned != verdict.reason:
            log.warning(
                "not ready for %.0fs (%s): %s; %s", spell, verdict.reason, verdict.detail, advice
            )
            self._warned = verdict.reason


def _error(outcome: object) -> str | None:
    if not isinstance(outcome, BaseException):
        return None
    return f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__


_ADVICE = {
    Reason.STORE_UNREACHABLE: "check TALLY_CLICKHOUSE_URL and that the store runs",
    Reason.KAFKA_UNREACHABLE: "check TALLY_KAFKA_BOOTSTRAP and that the broker runs",
    Reason.NO_WORKER: "start `tally worker` (or `tally up`) with this TALLY_CONSUMER_GROUP",
    Reason.NO_SINK: "start one `tally sink` for this store (or `tally up`)",
    Reason.PROCESSORS_BEHIND: "see tally_worker_lag_messages; add workers if it keeps growing",
}
