"""Holding accounts to their plans at the gateway: the decision core (pure, no I/O).

Per account the core keeps what Tally last said (`Synced`, from POST
/api/v1/admin/limits, computed by the code behind /api/v1/account/usage) and what
this gateway did since (`LocalUse`: admitted requests, units charged, streams opened
and closed), each with its event time. A decision is made from

    Tally's counts  +  this gateway's uses not yet reflected in them

and a local use is dropped once Tally's counts reflect it: when the synced
`reflected_until` (the time up to which the account's own partition is counted, or
every partition when the partition is not known: enforcement_sync.account_reflected)
has passed its event time by `margin_s`. Per account, so one lagging partition keeps
only its own accounts' uses. The margin covers the time between an event's
time (the request's start) and its reaching Kafka (the call's latency, the metering
queue, the producer's linger): an event of ours published after a later one of
another gateway is not counted yet although `reflected_until` passed its time. Too
small a margin counts our use twice for a moment (a refusal a little early); the
uses are never lost, so the gateway sees at least what Tally will show.

Decisions, in this order (docs/gateway-integration.md#enforcing-plans):

* session or weekly `used_percentage` (schemas.windows.used_percentage, the usage
  endpoint's function) of synced + local units >= 100 -> `quota_exceeded`, retry at
  the window's end;
* requests in the current UTC minute (the API's minute: epoch seconds // 60) >=
  per_minute -> `rate_limited`, retry at the minute's end;
* a call that opens a stream while active streams >= max_streams ->
  `too_many_streams`.

An account Tally has not answered for yet, or whose last answer is older than
`stale_after_s` (Tally unreachable), is NOT refused: enforcement fails open and
counts the call in `EnforcementStats.unsynced_allowed`; metering goes on regardless.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from schemas.ratelimit_fields import plan_fields, seconds_until
from schemas.windows import used_percentage

MINUTE_S: Final = 60

RATE_LIMITED: Final = "rate_limited"
QUOTA_EXCEEDED: Final = "quota_exceeded"
TOO_MANY_STREAMS: Final = "too_many_streams"


@dataclass(frozen=True, slots=True)
class Quota:
    """A session or weekly window as Tally counted it."""

    used_micro: int
    limit_units: float
    resets_at: float | None
    """Epoch seconds of the window's end; None: no window running (first_request)."""


@dataclass(frozen=True, slots=True)
class Synced:
    """One account's limits and counts as Tally answered them, at `reflected_until`."""

    per_minute: int
    minute_start: float
    """Epoch seconds of the minute `minute_requests` belongs to."""
    minute_requests: int
    session: Quota
    weekly: Quota
    active_streams: int
    max_streams: int
    reflected_until: float | None
    """The account's events up to this time (epoch s) are in the counts (its partition's
    time, or the least over partitions); None: nothing counted yet."""


@dataclass(slots=True)
class LocalUse:
    """One use by this gateway not yet reflected in Tally's counts."""

    at: float
    """The event time (epoch s) of what it stands for."""
    requests: int = 0
    units_micro: int = 0
    streams: int = 0
    """+1 a stream opened, -1 one closed."""
    dropped: bool = False


class Refusal(NamedTuple):
    status: int
    code: str
    message: str
    headers: dict[str, str]


@dataclass(slots=True)
class EnforcementStats:
    decisions: int = 0
    refused_rate: int = 0
    refused_quota: int = 0
    refused_streams: int = 0
    unsynced_allowed: int = 0
    """Calls allowed because Tally had not answered for the account (new, or stale)."""
    syncs: int = 0
    sync_failures: int = 0
    sync_seconds_max: float = 0.0
    """The longest limits read (its round trip, RTT in the overshoot bound)."""


@dataclass(slots=True)
class AccountState:
    synced: Synced | None = None
    synced_at: float = -math.inf
    last_seen: float = 0.0
    uses: deque[LocalUse] = field(default_factory=deque)
    minute_requests: dict[int, int] = field(default_factory=dict)
    """Local requests per minute start (epoch s): an O(1) count per decision."""
    units_micro: int = 0
    streams: int = 0


def _minute_of(at: float) -> int:
    return int(at // MINUTE_S) * MINUTE_S


class Enforcer:
    """The decision core: synced state + local uses, per account (module doc)."""

    def __init__(self, *, margin_s: float = 2.0, stale_after_s: float = 10.0) -> None:
        if margin_s < 0 or stale_after_s <= 0:
            raise ValueError("margin_s must be >= 0 and stale_after_s > 0")
        self.margin_s = margin_s
        self.stale_after_s = stale_after_s
        self.stats = EnforcementStats()
        self.accounts: dict[str, AccountState] = {}

    def state(self, account: str) -> AccountState:
        state = self.accounts.get(account)
        if state is None:
            state = self.accounts[account] = AccountState()
        return state

    # -- what this gateway does ------------------------------------------------

    def admit(self, account: str, at: float) -> LocalUse:
        """Count an admitted request (event time `at`); charge its units later."""
        state = self.state(account)
        state.last_seen = at
        use = LocalUse(at, requests=1)
        state.uses.append(use)
        minute = _minute_of(at)
        state.minute_requests[minute] = state.minute_requests.get(minute, 0) + 1
        return use

    def charge(self, account: str, use: LocalUse, units: float) -> None:
        """Add the units of an admitted request, known once it ended."""
        if use.dropped:
            return  # already in Tally's counts by its time; nothing to add locally
        micro = round(units * 1_000_000)
        use.units_micro += micro
        self.state(account).units_micro += micro

    def stream_opened(self, account: str, at: float) -> None:
        self._add(account, LocalUse(at, streams=1))

    def stream_closed(self, account: str, at: float, units: float) -> None:
        self._add(account, LocalUse(at, streams=-1, units_micro=round(units * 1_000_000)))

    def _add(self, account: str, use: LocalUse) -> None:
        state = self.state(account)
        state.uses.append(use)
        state.units_micro += use.units_micro
        state.streams += use.streams

    # -- what Tally says --------------------------------------------------------

    def apply(self, account: str, synced: Synced | None, now: float) -> None:
        """Tally's answer for `account` (None: not an account: never refused)."""
        state = self.state(account)
        state.synced = synced
        state.synced_at = now
        self.stats.syncs += 1
        if synced is None:
            # Not an account: nothing to hold it to, nothing to remember for it.
            self._prune(state, math.inf)
        elif synced.reflected_until is not None:
            self._prune(state, synced.reflected_until - self.margin_s)

    def _prune(self, state: AccountState, cutoff: float) -> None:
        uses = state.uses
        while uses and uses[0].at <= cutoff:
            use = uses.popleft()
            use.dropped = True
            state.units_micro -= use.units_micro
            state.streams -= use.streams
            if use.requests:
                minute = _minute_of(use.at)
                left = state.minute_requests.get(minute, 0) - use.requests
                if left > 0:
                    state.minute_requests[minute] = left
                else:
                    state.minute_requests.pop(minute, None)

    def active(self, since: float) -> list[str]:
        """Accounts seen since `since` (to sync); forgets idle ones once nothing of theirs
        awaits Tally (no local use left, or Tally does not know them)."""
        idle = [
            a
            for a, s in self.accounts.items()
            if s.last_seen < since and (not s.uses or (s.synced is None and s.synced_at > 0))
        ]
        for account in idle:
            del self.accounts[account]
        return [a for a, s in self.accounts.items() if s.last_seen >= since]

    # -- deciding ---------------------------------------------------------------

    def decide(self, account: str, now: float, opens_stream: bool = False) -> Refusal | None:
        """None: allow. Never raises for an unknown or unsynced account: allows it."""
        self.stats.decisions += 1
        state = self.state(account)
        state.last_seen = now
        synced = state.synced
        if now - state.synced_at > self.stale_after_s:
            self.stats.unsynced_allowed += 1
            return None
        if synced is None:
            return None  # not an account in Tally: nothing to hold it to
        minute = _minute_of(now)
        requests = state.minute_requests.get(minute, 0)
        if synced.minute_start == minute:
            requests += synced.minute_requests
        streams = max(0, synced.active_streams + state.streams)
        for name, quota in (("session", synced.session), ("weekly", synced.weekly)):
            if self._exhausted(state, quota, now):
                self.stats.refused_quota += 1
                retry = _retry(quota.resets_at, now, default=MINUTE_S)
                return _refusal(
                    synced, requests, streams, minute, now, QUOTA_EXCEEDED,
                    f"the plan's {name} quota is used up; it resets in {retry}s",
                    retry,
                )  # fmt: skip
        if requests >= synced.per_minute:
            self.stats.refused_rate += 1
            retry = _retry(minute + MINUTE_S, now, default=MINUTE_S)
            return _refusal(
                synced, requests, streams, minute, now, RATE_LIMITED,
                f"over the plan's {synced.per_minute} requests per minute; retry in {retry}s",
                retry,
            )  # fmt: skip
        if opens_stream and streams >= synced.max_streams:
            self.stats.refused_streams += 1
            return _refusal(
                synced, requests, streams, minute, now, TOO_MANY_STREAMS,
                f"{streams} streams open, the plan allows {synced.max_streams}; "
                "close one and retry",
                1,
            )  # fmt: skip
        return None

    def _exhausted(self, state: AccountState, quota: Quota, now: float) -> bool:
        if quota.resets_at is not None and quota.resets_at <= now:
            # The synced window ended: only what this gateway used since counts.
            local = sum(u.units_micro for u in state.uses if u.at >= quota.resets_at)
            return used_percentage(local, quota.limit_units) >= 100
        used = quota.used_micro + max(0, state.units_micro)
        return used_percentage(used, quota.limit_units) >= 100


def _retry(reset_at: float | None, now: float, *, default: int) -> int:
    if reset_at is None:
        return default
    return max(1, math.ceil(reset_at - now))


def _refusal(
    synced: Synced,
    requests: int,
    streams: int,
    minute: int,
    now: float,
    code: str,
    message: str,
    retry_after: int,
) -> Refusal:
    reset_epoch = minute + MINUTE_S
    headers = plan_fields(
        per_minute=synced.per_minute,
        remaining=max(0, synced.per_minute - requests),
        reset_epoch=reset_epoch,
        reset_in=seconds_until(reset_epoch, now),
        max_streams=synced.max_streams,
        streams_remaining=max(0, synced.max_streams - streams),
    )
    headers["Retry-After"] = str(retry_after)
    return Refusal(429, code, message, headers)
