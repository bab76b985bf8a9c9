"""The admin operations (docs/api.md#administration): blocking, shared by the API and the CLI.

The admin routes (query_api/routes/admin.py) run each in a thread; `tally
accounts|keys` runs the same ones when it opens the store directly
(deploy/admin_store.py), and `tally reconcile` runs `account_totals`: so the CLI and
the API answer alike. Refusals are `ApiError`s, the API's one error envelope.
Nothing is cached: a plan change or a revocation holds from the very next request.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from query_api import queries
from query_api.accounts import Account, AccountStore, KeyInfo
from query_api.admin_models import (
    AccountCreatedOut,
    AccountCreateIn,
    AccountOut,
    AccountsOut,
    AccountTotalsOut,
    KeyCreatedOut,
    KeyCreateIn,
    KeyOut,
    KeyRevokedOut,
    PageMeta,
    PlanChangedOut,
    PlanChangeIn,
    PlanOut,
    TotalsMeta,
    TotalsOut,
)
from query_api.errors import ApiError
from query_api.exceptions import AccountExistsError, UnknownAccountError
from query_api.plans import Plan
from schemas.store import Store
from schemas.totals import stored_totals
from schemas.windows import format_time, minute_range

PAGE_MAX = 1000
ENV_ADMIN_PREFIX = "env:TALLY_ADMIN_KEY"


def _account_out(account: Account) -> AccountOut:
    return AccountOut(id=account.id, plan=account.plan, created_at=format_time(account.created_at))


def _key_out(info: KeyInfo) -> KeyOut:
    return KeyOut(
        key_prefix=info.prefix,
        account=info.account,
        admin=info.admin,
        ingest=info.ingest,
        created_at=format_time(info.created_at),
        revoked_at=format_time(info.revoked_at) if info.revoked_at else None,
    )


def _no_account(account_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no account {account_id!r}")


def check_plan(plan: str, plans: Mapping[str, Plan], field: str = "plan") -> str:
    if plan not in plans:
        known = ", ".join(sorted(plans))
        raise ApiError(
            422, "validation_error", f"{field}: unknown plan {plan!r}; known plans: {known}"
        )
    return plan


def list_plans(plans: Mapping[str, Plan]) -> list[PlanOut]:
    return [PlanOut.model_validate(plans[name].model_dump()) for name in sorted(plans)]


def create_account(
    accounts: AccountStore, plans: Mapping[str, Plan], default_plan: str, body: AccountCreateIn
) -> AccountCreatedOut:
    if body.plan is None:
        if default_plan not in plans:
            known = ", ".join(sorted(plans))
            raise ApiError(
                422,
                "validation_error",
                f"plan: none given and the default plan {default_plan!r} (TALLY_DEFAULT_PLAN) "
                f"is not a known plan; name one of: {known}",
            )
        plan = default_plan
    else:
        plan = check_plan(body.plan, plans)
    try:
        account = accounts.create(body.id, plan)
    except AccountExistsError:
        raise ApiError(409, "conflict", f"account {body.id!r} exists already") from None
    key, _ = accounts.create_key(account.id, admin=False)
    return AccountCreatedOut(id=account.id, plan=account.plan, api_key=key)


def list_accounts(accounts: AccountStore, limit: int, after: str) -> AccountsOut:
    page = accounts.page(limit=limit, after=after)
    next_after = page[-1].id if len(page) == limit else None
    return AccountsOut(data=[_account_out(a) for a in page], meta=PageMeta(next_after=next_after))


def get_account(accounts: AccountStore, account_id: str) -> AccountOut:
    account = accounts.get(account_id)
    if account is None:
        raise _no_account(account_id)
    return _account_out(account)


def set_plan(
    accounts: AccountStore, plans: Mapping[str, Plan], account_id: str, body: PlanChangeIn
) -> PlanChangedOut:
    # An unknown account is 404 whatever the body says: the resource comes first.
    if accounts.get(account_id) is None:
        raise _no_account(account_id)
    plan = check_plan(body.plan, plans)
    try:
        account = accounts.set_plan(account_id, plan)
    except UnknownAccountError:
        raise _no_account(account_id) from None
    return PlanChangedOut(id=account.id, plan=account.plan)


def create_key(accounts: AccountStore, body: KeyCreateIn) -> KeyCreatedOut:
    try:
        key, info = accounts.create_key(body.account, admin=bool(body.admin))
    except UnknownAccountError:
        raise _no_account(body.account or "") from None
    return KeyCreatedOut(
        key_prefix=info.prefix,
        api_key=key,
        account=info.account,
        admin=info.admin,
        ingest=info.ingest,
    )


def list_keys(accounts: AccountStore, account_id: str | None) -> list[KeyOut]:
    if account_id is not None and accounts.get(account_id) is None:
        raise _no_account(account_id)
    return [_key_out(info) for info in accounts.keys(account_id)]


def revoke_key(accounts: AccountStore, key_prefix: str) -> KeyRevokedOut:
    if key_prefix == ENV_ADMIN_PREFIX:
        raise ApiError(
            404,
            "not_found",
            "TALLY_ADMIN_KEY is not a stored key; unset or change it where the API runs",
        )
    if not accounts.revoke_key(key_prefix):
        raise ApiError(404, "not_found", f"no active key with prefix {key_prefix!r}")
    return KeyRevokedOut(key_prefix=key_prefix, revoked=True)


def account_totals(
    store: Store, topic: str, start: datetime, end: datetime, account: str | None
) -> TotalsOut:
    """Per-account totals over the minutes starting in [start, end), and the offsets
    of `topic` they reflect: exactly those (queries.account_totals says why)."""
    since, until = minute_range(start, end)
    read = queries.account_totals(store, topic, since, until, account)
    offsets = read.counted_offsets
    totals = stored_totals(read.usage)
    data = [
        AccountTotalsOut(
            account=name,
            requests=t.requests,
            units=t.units_micro / 1_000_000,
            units_micro=t.units_micro,
            events=dict(sorted(t.events.items())),
        )
        for name, t in sorted(totals.items())
    ]
    meta = TotalsMeta(
        from_=format_time(start),
        to=format_time(end),
        minutes_from=format_time(since),
        minutes_to=format_time(max(since, until)),
        account=account,
        accounts=len(data),
        topic=topic,
        counted_offsets=None
        if offsets is None
        else {str(part): offset for part, offset in sorted(offsets.items())},
    )
    return TotalsOut(data=data, meta=meta)
