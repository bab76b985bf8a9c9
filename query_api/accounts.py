"""Accounts and API keys in the store (docs/api.md#plans-and-accounts): the adapter, kept thin.

Blocking calls (ClickHouse); the API runs them with `asyncio.to_thread`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from query_api.exceptions import AccountExistsError, UnknownAccountError
from query_api.keys import hash_key, new_key, prefix_of, same_key
from schemas.store import Store

SUBJECT_MAX = 128


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    plan: str
    billing_anchor_day: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an account's key, an admin key (account None), or an ingest key
    (neither: no account and not admin), which may only send events."""

    account: str | None
    admin: bool
    key_prefix: str

    @property
    def ingest(self) -> bool:
        """An ingest key (docs/api.md#events-over-http): sends events for any subject,
        reads nothing. Stored as the one row shape no other key has: no account, not
        admin (`AccountStore.create_key(None, admin=False)`)."""
        return self.account is None and not self.admin


@dataclass(frozen=True, slots=True)
class KeyInfo:
    prefix: str
    account: str | None
    admin: bool
    created_at: datetime
    revoked_at: datetime | None

    @property
    def ingest(self) -> bool:
        """As `Principal.ingest`: no account and not admin."""
        return self.account is None and not self.admin


def _version(current: int | None = None) -> int:
    """The version of a new row of an id whose rows reach `current` at most.

    ReplacingMergeTree keeps the row with the highest version, so a change must
    outrank every row of its id, whatever the clock says: the wall clock in
    nanoseconds, or one past the current version if that is ahead (a row written
    before the clock stepped back). A revocation that lost to its key's own row
    would bring the key back on the next restart.
    """
    return max(time.time_ns(), (current or 0) + 1)


class AccountsListener(Protocol):
    """Told of each account and key write right after it succeeded (query_api/view.py)."""

    def put_account(
        self, account_id: str, plan: str, anchor_day: int, created: datetime, version: int
    ) -> None: ...

    def put_key(
        self, prefix: str, key_hash: str, account: str | None, admin: bool, version: int
    ) -> None: ...

    def drop_key(self, prefix: str, version: int) -> None: ...


class AccountStore:
    def __init__(self, store: Store, listener: AccountsListener | None = None) -> None:
        self.store = store
        self.listener = listener

    def get(self, account_id: str) -> Account | None:
        rows = self.store.query(
            "SELECT id, plan, billing_anchor_day, created_at FROM accounts FINAL "
            "WHERE id = {id:String}",
            {"id": account_id},
        )
        return Account(*rows[0]) if rows else None

    def page(self, limit: int = 1000, after: str = "") -> list[Account]:
        rows = self.store.query(
            "SELECT id, plan, billing_anchor_day, created_at FROM accounts FINAL "
            "WHERE id > {after:String} ORDER BY id LIMIT {limit:UInt32}",
            {"after": after, "limit": limit},
        )
        return [Account(*row) for row in rows]

    def _current_version(self, table: str, column: str, value: str) -> int | None:
        # Over all rows, merged or not: the max is the version FINAL would pick.
        rows = self.store.query(
            f"SELECT max(version), count() FROM {table} WHERE {column} = {{v:String}}",
            {"v": value},
        )
        return int(rows[0][0]) if rows and rows[0][1] else None

    def create(self, account_id: str, plan: str, billing_anchor_day: int = 1) -> Account:
        # Check-then-insert is not atomic; two admins racing on one new id both
        # succeed and the later write wins. Acceptable for an admin operation.
        if self.get(account_id) is not None:
            raise AccountExistsError(account_id)
        now = datetime.now(UTC)
        version = _version()
        self.store.insert(
            "accounts",
            [[account_id, plan, billing_anchor_day, now, now, version]],
            ["id", "plan", "billing_anchor_day", "created_at", "updated_at", "version"],
        )
        if self.listener is not None:
            self.listener.put_account(account_id, plan, billing_anchor_day, now, version)
        return Account(account_id, plan, billing_anchor_day, now)

    def set_plan(self, account_id: str, plan: str) -> Account:
        current = self.get(account_id)
        if current is None:
            raise UnknownAccountError(account_id)
        version = _version(self._current_version("accounts", "id", account_id))
        self.store.insert(
            "accounts",
            [
                [
                    account_id,
                    plan,
                    current.billing_anchor_day,
                    current.created_at,
                    datetime.now(UTC),
                    version,
                ]
            ],
            ["id", "plan", "billing_anchor_day", "created_at", "updated_at", "version"],
        )
        if self.listener is not None:
            self.listener.put_account(
                account_id, plan, current.billing_anchor_day, current.created_at, version
            )
        return Account(account_id, plan, current.billing_anchor_day, current.created_at)

    def create_key(self, account_id: str | None, admin: bool) -> tuple[str, KeyInfo]:
        """A new key (returned once, never stored) and what is stored about it: an
        account's key, an admin key (no account, `admin`), or an ingest key (neither)."""
        if account_id is not None and admin:
            raise ValueError("a key belongs to an account or is an admin key, not both")
        if account_id is not None and self.get(account_id) is None:
            raise UnknownAccountError(account_id)
        key, prefix = new_key()
        now = datetime.now(UTC)
        key_hash = hash_key(key)
        version = _version()
        self.store.insert(
            "api_keys",
            [[prefix, key_hash, account_id or "", admin, now, None, version]],
            ["prefix", "key_hash", "account", "is_admin", "created_at", "revoked_at", "version"],
        )
        if self.listener is not None:
            self.listener.put_key(prefix, key_hash, account_id, admin, version)
        return key, KeyInfo(prefix, account_id, admin, now, None)

    def revoke_key(self, prefix: str) -> bool:
        rows = self.store.query(
            "SELECT key_hash, account, is_admin, created_at FROM api_keys FINAL "
            "WHERE prefix = {p:String} AND revoked_at IS NULL",
            {"p": prefix},
        )
        if not rows:
            return False
        key_hash, account, is_admin, created_at = rows[0]
        version = _version(self._current_version("api_keys", "prefix", prefix))
        self.store.insert(
            "api_keys",
            [[prefix, key_hash, account, is_admin, created_at, datetime.now(UTC), version]],
            ["prefix", "key_hash", "account", "is_admin", "created_at", "revoked_at", "version"],
        )
        if self.listener is not None:
            self.listener.drop_key(prefix, version)
        return True

    def keys(self, account_id: str | None = None) -> list[KeyInfo]:
        rows = self.store.query(
            "SELECT prefix, account, is_admin, created_at, revoked_at FROM api_keys FINAL "
            "WHERE {all:Bool} OR account = {a:String} ORDER BY created_at",
            {"all": account_id is None, "a": account_id or ""},
        )
        return [KeyInfo(p, a or None, bool(adm), c, r) for p, a, adm, c, r in rows]

    def authenticate(self, key: str) -> Principal | None:
        prefix = prefix_of(key)
        if prefix is None:
            return None
        rows = self.store.query(
            "SELECT key_hash, account, is_admin FROM api_keys FINAL "
            "WHERE prefix = {p:String} AND revoked_at IS NULL",
            {"p": prefix},
        )
        if not rows or not same_key(key, rows[0][0]):
            return None
        _, account, is_admin = rows[0]
        return Principal(account or None, bool(is_admin), prefix)
