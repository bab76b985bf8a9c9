"""`tally reconcile`'s rollup side: the per-account totals and counted offsets, read from
the store directly or through the admin API of a running stack (`GET
/api/v1/admin/totals`); both answer with the admin API's totals body, parsed by `view_of`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from deploy.admin_backend import HttpBackend, api_answers, api_target
from deploy.admin_store import StoreBackend, open_store_backend
from deploy.exceptions import AdminCliError, ReconcileError
from schemas.totals import AccountTotals
from schemas.windows import format_time

if TYPE_CHECKING:
    from schemas.store import Store


@dataclass(frozen=True)
class StoredView:
    accounts: dict[str, AccountTotals]
    counted_offsets: dict[int, int] | None
    """Per partition, the next offset not yet counted; None: no offsets stored."""


class TotalsSource(Protocol):
    @property
    def description(self) -> str: ...

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView: ...

    def close(self) -> None: ...


def view_of(doc: Mapping[str, Any], topic: str, since: datetime, until: datetime) -> StoredView:
    """Parse the admin API's totals body (both sources produce it)."""
    meta = doc["meta"]
    if meta["topic"] != topic:
        raise ReconcileError(
            f"the rollups answer for events topic {meta['topic']!r} but this check reads "
            f"{topic!r}; set TALLY_EVENTS_TOPIC to the topic the worker counts"
        )
    if (meta["minutes_from"], meta["minutes_to"]) != (format_time(since), format_time(until)):
        raise ReconcileError(
            f"the rollups were summed over {meta['minutes_from']}..{meta['minutes_to']}, not "
            f"{format_time(since)}..{format_time(until)}; the API runs another Tally version: "
            "upgrade it, or stop it and run this against the store"
        )
    accounts = {
        str(entry["account"]): AccountTotals(
            requests=int(entry["requests"]),
            units_micro=int(entry["units_micro"]),
            events={str(k): int(v) for k, v in entry["events"].items()},
        )
        for entry in doc["data"]
    }
    offsets = meta.get("counted_offsets")
    counted = None if offsets is None else {int(p): int(o) for p, o in offsets.items()}
    return StoredView(accounts, counted)


class StoreTotals:
    """The store, read in this process by the API's own operation."""

    def __init__(self, store: Store, owner: StoreBackend | None = None) -> None:
        self.store = store
        self._owner = owner

    @property
    def description(self) -> str:
        if self._owner is not None:
            return self._owner.description
        return f"the store directly (database {self.store.database})"

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView:
        from query_api.admin_ops import account_totals

        out = account_totals(self.store, topic, since, until, account)
        return view_of(out.model_dump(mode="json"), topic, since, until)

    def close(self) -> None:
        # Only a store this module opened is closed; a caller's store stays theirs.
        if self._owner is not None:
            self._owner.close()


class ApiTotals(HttpBackend):
    """`GET /api/v1/admin/totals` of a running stack, with the admin CLI's error handling."""

    def totals(
        self, topic: str, since: datetime, until: datetime, account: str | None
    ) -> StoredView:
        params = {"from": format_time(since), "to": format_time(until)}
        if account is not None:
            params["account"] = account
        try:
            doc = self._call("GET", "/totals", params=params)
        except AdminCliError as exc:
            if exc.status == 404:
                raise ReconcileError(
                    f"the API at {self.api_url} has no /api/v1/admin/totals (an older Tally); "
                    "upgrade it, or stop it and run this against the store"
                ) from None
            raise ReconcileError(exc.message) from None
        return view_of(doc, topic, since, until)


StoreOpener = Callable[[str, bool], StoreBackend]


def choose_source(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    probe: Callable[[str], bool] = api_answers,
    open_store: StoreOpener = open_store_backend,
) -> tuple[TotalsSource, str]:
    """The admin API when it answers and an admin key is set, else the store (as the admin
    CLI decides); and a line for stderr saying which and why."""
    api = api_target(args.api_url, args.admin_key, environ, probe)
    if api.up and api.admin_key is not None:
        through = f"tally: reading rollups through the API at {api.url}"
        return ApiTotals(api.url, api.admin_key), through
    try:
        backend = open_store(api.url, api.up)
    except AdminCliError as exc:
        raise ReconcileError(exc.message) from None
    source = StoreTotals(backend.store, backend)
    return source, f"tally: reading rollups from {backend.description}: {api.why_not}"
