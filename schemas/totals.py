"""Per-account usage totals and how the log's recount compares with the rollups (pure).

`tally reconcile` (deploy/reconcile_cli.py) and the admin totals endpoint
(query_api/admin_ops.py) fold rollup rows with `stored_totals`; the recount of
the events log (processors/reconcile.py) folds events into the same
`AccountTotals`; `compare` says, per account and measure, where they differ.

Measures per account: `requests` (tally.request.v1 events), `events` per type,
and `units_micro`: the units of requests and of closed streams, in integer
millionths summed per event with `to_micro`, as the worker and the store do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from schemas.events import REQUEST, STREAM_CLOSED, AnyEvent, RequestEvent, StreamClosedEvent
from schemas.rollup_table import MARKER_ACCOUNT, to_micro

UNIT_TYPES = (REQUEST, STREAM_CLOSED)
"""The event types whose units count (stream opens carry none)."""


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
