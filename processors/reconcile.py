"""Recount usage from the retained Kafka log and compare it with the rollups (pure).

`tally reconcile` (deploy/reconcile_cli.py) feeds every retained message of the
events topic to a `Recount`, reads the per-account rollup totals for the same
minutes, and hands both to `compare`. Nothing here does I/O, so the rules below
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
  split: `align_range` keeps the minutes whose *start* lies in [from, to), the
  rule the analytics API uses (query_api/routes/analytics.py, `minute_range`).
  `from=10:00:30Z` therefore begins with the 10:01 minute. An event counts when its
  minute (its time floored to the minute, exactly as the worker files it) is in
  the aligned range; deduplication happens before this filter, so an earlier copy
  outside the range still shadows a later copy inside it, as in the worker.
- **Measures per account**: `requests` (tally.request.v1 events), `events` per
  type, and `units_micro`: the units of requests and of closed streams, in integer
  millionths summed per event with `to_micro`, as the worker and the store do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from processors.decode import AnyEvent, Limits, decode_message
from processors.rollup import MARKER_ACCOUNT, key_of, to_micro
from schemas.events import REQUEST, STREAM_CLOSED, RequestEvent, StreamClosedEvent

MINUTE = timedelta(minutes=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
UNIT_TYPES = (REQUEST, STREAM_CLOSED)
"""The event types whose units count (stream opens carry none)."""


def _ceil_minute(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    start = EPOCH + (t - EPOCH) // MINUTE * MINUTE
    return start if start == t else start + MINUTE


def align_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The minutes whose start lies in [start, end), as [first, stop) (both UTC).

    Empty (first >= stop) when no minute starts inside the range.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("range bounds must carry a zone")
    return _ceil_minute(start), _ceil_minute(end)


@dataclass(slots=True)
class AccountTotals:
    """One account's usage over the range, from the log or from the rollups."""

    requests: int = 0
    units_micro: int = 0
    events: dict[str, int] = field(default_factory=dict)
    """Events per type; a type with no events is absent."""

    def add(self, event: AnyEvent) -> None:
        self.events[event.type] = self.events.get(event.type, 0) + 1
        if isinstance(event, RequestEvent):
            self.requests += 1
            self.units_micro += to_micro(event.data.units)
        elif isinstance(event, StreamClosedEvent):
            self.units_micro += to_micro(event.data.units)

    def measures(self) -> dict[str, int]:
        """Every measure by name; a zero count and an absent one are the same."""
        found = {"requests": self.requests, "units_micro": self.units_micro}
        for kind in sorted(self.events):
            if self.events[kind]:
                found[f"events.{kind}"] = self.events[kind]
        return found


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
        """`since`/`until`: a minute-aligned range from `align_range`."""
        self.since_s = int(since.timestamp())
        self.until_s = int(until.timestamp())
        if since != _ceil_minute(since) or until != _ceil_minute(until):
            raise ValueError("since/until must be minute-aligned (see align_range)")
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


def stored_totals(rows: Iterable[tuple[str, str, int, int]]) -> dict[str, AccountTotals]:
    """Fold rollup rows (account, type, events, units_micro), any grouping, per account.

    The reserved account '' (offset markers) is skipped. Units count for requests
    and closed streams only, as everywhere in the API.
    """
    found: dict[str, AccountTotals] = {}
    for account, kind, events, units_micro in rows:
        if account == MARKER_ACCOUNT:
            continue
        totals = found.get(account)
        if totals is None:
            totals = found[account] = AccountTotals()
        if events:
            totals.events[kind] = totals.events.get(kind, 0) + int(events)
        if kind == REQUEST:
            totals.requests += int(events)
        if kind in UNIT_TYPES:
            totals.units_micro += int(units_micro)
    return found


@dataclass(frozen=True, slots=True)
class Difference:
    measure: str
    """`requests`, `units_micro` or `events.<type>`."""
    expected: int
    """Recounted from the log."""
    stored: int
    """Summed from the rollups."""

    @property
    def delta(self) -> int:
        """Rollups minus log: positive = counted too much, negative = too little."""
        return self.stored - self.expected


@dataclass(frozen=True, slots=True)
class AccountDrift:
    account: str
    expected: AccountTotals | None
    """None: no event of this account in the range in the log."""
    stored: AccountTotals | None
    """None: no rollup row of this account in the range."""
    differences: tuple[Difference, ...]


@dataclass(frozen=True, slots=True)
class DriftReport:
    since: datetime
    until: datetime
    accounts: int
    """Accounts seen on either side."""
    events: int
    """Events recounted from the log in the range."""
    units_micro: int
    """Units recounted from the log in the range."""
    drifts: tuple[AccountDrift, ...]
    """Accounts whose measures differ, by account id."""

    @property
    def ok(self) -> bool:
        return not self.drifts


def compare(
    expected: Mapping[str, AccountTotals],
    stored: Mapping[str, AccountTotals],
    since: datetime,
    until: datetime,
) -> DriftReport:
    """Per account, every measure of the log against the rollups.

    An account missing on one side compares as all zeros there, so a stored row
    with nothing in it is not drift, while any count on one side only is.
    """
    drifts = []
    empty = AccountTotals()
    for account in sorted(set(expected) | set(stored)):
        want = expected.get(account)
        have = stored.get(account)
        want_measures = (want or empty).measures()
        have_measures = (have or empty).measures()
        differences = tuple(
            Difference(name, want_measures.get(name, 0), have_measures.get(name, 0))
            for name in _ordered(set(want_measures) | set(have_measures))
            if want_measures.get(name, 0) != have_measures.get(name, 0)
        )
        if differences:
            drifts.append(AccountDrift(account, want, have, differences))
    return DriftReport(
        since=since,
        until=until,
        accounts=len(set(expected) | set(stored)),
        events=sum(sum(t.events.values()) for t in expected.values()),
        units_micro=sum(t.units_micro for t in expected.values()),
        drifts=tuple(drifts),
    )


def _ordered(names: set[str]) -> list[str]:
    # requests and units first, then the per-type counts by type.
    head = [n for n in ("requests", "units_micro") if n in names]
    return head + sorted(names - set(head))


def format_units(micro: int) -> str:
    """Exact decimal units from millionths: 1500000 -> '1.5', -250 -> '-0.00025'."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    text = f"{whole:,}"
    if frac:
        text += "." + f"{frac:06d}".rstrip("0")
    return sign + text
