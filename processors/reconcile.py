"""Recount usage from the retained Kafka log with the worker's validation (pure).

`tally reconcile` (deploy/reconcile_cli.py) feeds every retained message of the
events topic to a `Recount`, reads the per-account rollup totals for the same
minutes, and hands both to `schemas.totals.compare`. Nothing here does I/O, so the rules below
are the whole of what "expected" means:

- **Validation is the worker's.** Each message goes through `decode_message` with
  the worker's `Limits`. The clock-dependent rules (more than 5 minutes in the
  future, older than the lateness bound) need a `now`; the worker used its wall
  clock when it processed the message, which is gone. Reconcile uses the message's
  Kafka record timestamp instead: the time it was published, which is when a
  worker keeping up saw it, give or take its lag. The edge: an event whose time is
  within that lag of a bound can be judged differently. A worker that was an hour
  behind accepted an event published 5 min 30 s before its own time (reconcile
  says `time_in_future`), and rejected one published just inside the lateness
  bound (reconcile accepts it). Both show up as drift for that account; near the
  bounds such drift is this approximation, not lost or double counts.
- **Deduplication is by exact (`source`, `id`) over the whole scan**, as the
  contract states it: the first valid copy counts, later ones never do, whatever
  their time. The worker only remembers keys within its dedup window
  (TALLY_DEDUP_WINDOW_S, per partition), so it counts a re-send that arrives
  later than that a second time; reconcile does not, and reports the difference
  as drift. That is the point: the contract says once. Rejected events never
  take part in deduplication, in the worker or here.
- **The range is whole minutes.** Rollups are per minute, so a minute cannot be
  split: `schemas.windows.minute_range` keeps the minutes whose *start* lies in
  [from, to), the rule the analytics API and the admin totals use too.
  `from=10:00:30Z` therefore begins with the 10:01 minute. An event counts when its
  minute (its time floored to the minute, exactly as the worker files it) is in
  the aligned range; deduplication happens before this filter, so an earlier copy
  outside the range still shadows a later copy inside it, as in the worker.
- **Measures per account** are those of `schemas.totals.AccountTotals`; `compare` there
  says where the recount and the rollups differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from processors.decode import Limits, decode_message
from processors.rollup import key_of
from schemas.events import AnyEvent
from schemas.totals import AccountTotals
from schemas.windows import MINUTE, ceil_to


@dataclass(slots=True)
class RecountStats:
    messages: int = 0
    events: int = 0
    """Valid events decoded (duplicates included)."""
    duplicates: int = 0
    """Valid events whose (source, id) was seen earlier in the scan."""
    rejected: int = 0
    """Rejections: whole messages or single events of a batch (dead letters)."""
    counted: int = 0
    """First copies inside the range (and of the account asked for, if any)."""


class Recount:
    """Folds scanned messages, in each partition's offset order, into expected totals.

    Memory grows with the distinct (source, id) keys of the scan (roughly 150-200
    bytes each): exact deduplication over the whole log has no bounded form.
    """

    def __init__(
        self, since: datetime, until: datetime, limits: Limits, account: str | None = None
    ) -> None:
        """`since`/`until`: a minute-aligned range from `schemas.windows.minute_range`."""
        self.since_s = int(since.timestamp())
        self.until_s = int(until.timestamp())
        if since != ceil_to(since, MINUTE) or until != ceil_to(until, MINUTE):
            raise ValueError("since/until must be minute-aligned (see minute_range)")
        self.limits = limits
        self.account = account
        self.totals: dict[str, AccountTotals] = {}
        self.stats = RecountStats()
        self._seen: set[tuple[str, str]] = set()
        # Few gateways, many events: one string object per source keeps keys small.
        self._sources: dict[str, str] = {}

    def add_message(self, value: bytes | None, published: datetime) -> None:
        """One Kafka message, judged as if the worker saw it at `published` (its
        record timestamp; see the module docstring for why and where that differs)."""
        events, rejections = decode_message(value, published, self.limits)
        self.stats.messages += 1
        self.stats.rejected += len(rejections)
        self.add_events(events)

    def add_events(self, events: Iterable[AnyEvent]) -> None:
        """Valid events, in log order."""
        for event in events:
            self.stats.events += 1
            source = self._sources.setdefault(event.source, event.source)
            key = (source, event.id)
            if key in self._seen:
                self.stats.duplicates += 1
                continue
            self._seen.add(key)
            if self.account is not None and event.subject != self.account:
                continue
            if not self.since_s <= key_of(event)[1] < self.until_s:
                continue
            totals = self.totals.get(event.subject)
            if totals is None:
                totals = self.totals[event.subject] = AccountTotals()
            totals.add(event)
            self.stats.counted += 1
