"""The records the usage view (query_api/view.py) and its feed (view_feed.py) share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class Horizon:
    """The oldest minute each kind of read may ask for; older data is not held."""

    minutes: int
    streams: int


@dataclass(slots=True)
class Versions:
    """Per account id and per key prefix, the version (ReplacingMergeTree's) of the
    row the view holds; revoked keys included. A row only replaces a newer one's
    effect when its version is higher, as FINAL would pick it."""

    accounts: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    newest_account: int = 0
    newest_key: int = 0

    def take_account(self, account_id: str, version: int) -> bool:
        """Record `version` for `account_id`; False when as new or newer is held."""
        if self.accounts.get(account_id, -1) >= version:
            return False
        self.accounts[account_id] = version
        self.newest_account = max(self.newest_account, version)
        return True

    def take_key(self, prefix: str, version: int) -> bool:
        if self.keys.get(prefix, -1) >= version:
            return False
        self.keys[prefix] = version
        self.newest_key = max(self.newest_key, version)
        return True


@dataclass(slots=True)
class Snapshot:
    """What the loaded rollups reflect: per `tally.rollups` partition the next offset
    not in them, and per events partition the offset up to which its events are
    counted (the sink's markers, read in the same statement as the rollups)."""

    rollups: dict[int, int]
    counted: dict[int, int]


class AccountChange(NamedTuple):
    """An account's row as FINAL returns it (a poll of other processes' writes)."""

    id: str
    plan: str
    anchor_day: int
    created: datetime
    version: int


class KeyChange(NamedTuple):
    """A key's row as FINAL returns it; `revoked` drops it from the view."""

    prefix: str
    key_hash: str
    account: str
    admin: bool
    revoked: bool
    version: int
